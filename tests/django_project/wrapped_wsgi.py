"""The alternative to MIDDLEWARE: Django's WSGI application wrapped in perrequest.wsgi."""

import os

from django.core.wsgi import get_wsgi_application

from perrequest.wsgi import RequestScopeMiddleware

from .hooks import record_close

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings_wrapped")

application = RequestScopeMiddleware(get_wsgi_application(), on_close=record_close)
