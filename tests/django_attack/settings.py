"""Settings of the attack project; see ``__init__``."""

import os

SECRET_KEY = "perrequest-attack-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "django_attack.urls"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("ATTACK_DB", ":memory:"),
    }
}
SESSION_ENGINE = "django.contrib.sessions.backends.db"
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
CACHE_MIDDLEWARE_SECONDS = 60

_PERREQUEST = "perrequest.django.RequestScopeMiddleware"
# Outermost: what a request finds before any scope; then one failing after perrequest.
_PROBE = "django_attack.middleware.probe"
_ABOVE = "django_attack.middleware.RaisingAbove"
_INNER = [
    "django_attack.middleware.Retaining",
    "django_attack.middleware.Raising",
    "django_attack.middleware.Recovering",
]
_DJANGO = [
    "django.middleware.cache.UpdateCacheMiddleware",
    "django.middleware.gzip.GZipMiddleware",
    "django.middleware.http.ConditionalGetMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
_FETCH = "django.middleware.cache.FetchFromCacheMiddleware"
_ORDER = os.environ.get("ATTACK_ORDER", "first")
if _ORDER == "first":
    MIDDLEWARE = [_PROBE, _ABOVE, _PERREQUEST, *_DJANGO, *_INNER, _FETCH]
elif _ORDER == "sync-below":  # under ASGI, Django runs perrequest's middleware in a thread
    _SYNC = "django_attack.middleware.sync_only"
    MIDDLEWARE = [_PROBE, _ABOVE, _PERREQUEST, _SYNC, *_DJANGO, *_INNER, _FETCH]
else:
    MIDDLEWARE = [_PROBE, _ABOVE, *_DJANGO, _PERREQUEST, *_INNER, _FETCH]

PERREQUEST = {"MAX_ENTRIES": 1000}
