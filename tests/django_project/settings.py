"""Settings of the test project: perrequest's middleware first, a lookup middleware inside it."""

from pathlib import Path

SECRET_KEY = "perrequest-tests-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True

MIDDLEWARE = [
    "perrequest.django.RequestScopeMiddleware",
    "django_project.middleware.lookup_middleware",
]

PERREQUEST = {"MAX_ENTRIES": 1000, "ON_CLOSE": "django_project.hooks.record_close"}

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "OPTIONS": {"context_processors": ["django_project.hooks.lookup_context"]},
    }
]
