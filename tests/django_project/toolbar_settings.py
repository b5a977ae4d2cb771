"""The test project with Django Debug Toolbar and perrequest's panel, as in development.

perrequest's middleware is listed above the toolbar's, so the panel reads the
store while it is still open (entries per function). ``runserver`` serves it
for the browser test; the in-process tests apply it with ``use_toolbar()``.
"""

from pathlib import Path

SECRET_KEY = "perrequest-tests-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.toolbar_urls"
INSTALLED_APPS = ["django.contrib.staticfiles", "debug_toolbar"]
DATABASES: dict[str, object] = {}
USE_TZ = True
STATIC_URL = "/static/"
INTERNAL_IPS = ["127.0.0.1"]

MIDDLEWARE = [
    "perrequest.django.RequestScopeMiddleware",
    "debug_toolbar.middleware.DebugToolbarMiddleware",
]

PERREQUEST = {"MAX_ENTRIES": 20}

DEBUG_TOOLBAR_PANELS = [
    "debug_toolbar.panels.timer.TimerPanel",
    "debug_toolbar.panels.headers.HeadersPanel",
    "debug_toolbar.panels.request.RequestPanel",
    "debug_toolbar.panels.templates.TemplatesPanel",
    "perrequest.django.toolbar.PerRequestPanel",
]
DEBUG_TOOLBAR_CONFIG = {
    "IS_RUNNING_TESTS": False,
    "SHOW_TOOLBAR_CALLBACK": "django_project.toolbar_views.show_toolbar",
}

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "APP_DIRS": True,
    }
]
