"""Optional: ``"perrequest.django"`` in ``INSTALLED_APPS`` makes ``manage.py check``
validate ``settings.PERREQUEST``, as it validates Django's own settings (the middleware
alone reads it only when Django builds the middleware stack)."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.core.exceptions import ImproperlyConfigured


class PerRequestConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    name = "perrequest.django"
    label = "perrequest"
    verbose_name = "perrequest"

    def ready(self) -> None:
        checks.register(check_settings)


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``perrequest.E001``: what the middleware would raise for ``settings.PERREQUEST``."""
    from ._settings import read_settings

    try:
        read_settings()
    except Exception as exc:  # ImproperlyConfigured; or what an odd value raised reading it
        # Our messages name settings.PERREQUEST (and the key) already.
        text = str(exc) if isinstance(exc, ImproperlyConfigured) else f"reading it raised {exc!r}"
        if not text.startswith("settings.PERREQUEST"):
            text = f"settings.PERREQUEST: {text}"
        return [checks.Error(text, id="perrequest.E001")]
    return []
