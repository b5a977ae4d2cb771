"""Settings of the example: perrequest's middleware first, then the one that loads the user."""

import os
from pathlib import Path

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "perrequest-example-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "django_example.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}  # the permission store is plain sqlite3, see permissions.py
USE_TZ = True

MIDDLEWARE = [
    # First, so every middleware below, the view and the template share one store.
    "perrequest.django.RequestScopeMiddleware",
    "django_example.middleware.current_user",
]

PERREQUEST = {
    "MAX_ENTRIES": 1_000,  # a request needs a handful; the bound is a safety net
    "ON_CLOSE": "django_example.permissions.record_stats",
}

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "OPTIONS": {
            "context_processors": ["django_example.permissions.context_processor"],
            # {% load catalog %}: tags resolving related objects through @request_batch loaders
            "libraries": {"catalog": "django_example.catalog_tags"},
        },
    }
]
