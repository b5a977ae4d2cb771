"""``uvicorn django_attack.asgi:application`` (tests/ on the path; ``ATTACK_DB`` set)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_attack.settings")

import django

django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.management import call_command  # noqa: E402

import django_attack.middleware  # noqa: E402, F401 - the signal receivers

call_command("migrate", verbosity=0, interactive=False)
application = get_asgi_application()
