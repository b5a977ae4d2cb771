"""ASGI entry point: ``uvicorn django_project.asgi:application`` (with tests/ on the path)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

application = get_asgi_application()
