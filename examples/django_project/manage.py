#!/usr/bin/env python
"""perrequest with Django: a permission lookup that hits SQLite once per request, not once per call.

The current user's permissions are needed by the middleware (may they see the
site at all?), by the view (may they edit?) and by the template (which links
to show?). ``django_example.permissions.user_permissions`` runs a real SQLite
query and is decorated with ``@request_memo``: the first caller in a request
runs the query, the others get the same frozenset, and the entry is gone when
the response is closed. No process-wide dict grows with every user ever seen.

Run it from the repository root (``pip install -e '.[django]'`` first)::

    python examples/django_project/manage.py runserver 127.0.0.1:8000

or under a production server, from this directory::

    cd examples/django_project
    gunicorn django_example.wsgi:application --bind 127.0.0.1:8000
    uvicorn django_example.asgi:application --host 127.0.0.1 --port 8000

Then::

    curl -i -H 'X-User: alice' http://127.0.0.1:8000/           # X-Permission-Queries: 1
    curl -i -H 'X-User: bob' http://127.0.0.1:8000/api/orders/  # async view, 1 query
    curl -i http://127.0.0.1:8000/                              # guest: 403 (1 query: /stats/)
    curl http://127.0.0.1:8000/stats/                           # totals across requests

``/stats/`` reports how many permission queries and requests ran so far, and
the last request's store stats (from the ``ON_CLOSE`` hook in settings.py).
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_example.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
