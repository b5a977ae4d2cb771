"""A minimal Django project for perrequest's tests, served by the test clients and real servers.

In the test process, ``use_settings()`` applies this project's settings over
whatever Django was configured with, so the tests do not depend on which test
module configured Django first. Under gunicorn, ``wsgi.py`` configures it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

# Settings that override_settings cannot swap safely; the rest are applied per test module.
_FIXED = {"DATABASES", "INSTALLED_APPS", "SECRET_KEY"}


def setup() -> None:
    """Configure Django with this project unless something configured it already.

    ``settings.configure`` rather than ``DJANGO_SETTINGS_MODULE``: the variable
    would leak into every subprocess the test session starts.
    """
    import django
    from django.conf import settings

    if not settings.configured:
        from . import settings as project

        settings.configure(**{name: getattr(project, name) for name in _names(project, set())})
    django.setup()


def _names(module: ModuleType, skip: set[str]) -> list[str]:
    return [name for name in dir(module) if name.isupper() and name not in skip]


def use_settings(module: ModuleType) -> Any:
    """An ``override_settings`` applying every upper-case name in ``module``."""
    from django.test import override_settings

    names = _names(module, _FIXED)
    return override_settings(**{name: getattr(module, name) for name in names})
