"""django.md, "Tests": closing a response in a ``TestCase`` as Django's test client does.
``response.close()`` sends ``request_finished``, whose ``close_old_connections`` closes the
test's database connection inside its transaction (a probe, 7 December): the next query
failed. The page's way ends the scope and keeps the connection. Run in a child process:
its own settings, an SQLite file (an in-memory database ignores the close)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, unittest
import django
from django.conf import settings

settings.configure(
    SECRET_KEY="x", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
    MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[1],
                           "TEST": {"NAME": sys.argv[2]}}},
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
)
django.setup()

from django.contrib.auth.models import User
from django.core.signals import request_finished
from django.db import close_old_connections
from django.http import HttpResponse
from django.test import RequestFactory, TestCase
from django.test.runner import DiscoverRunner

from perrequest import request_memo
from perrequest.django import RequestScopeMiddleware
from perrequest.testing import live_scopes


@request_memo
def user_count():
    return User.objects.count()


def view(request):
    return HttpResponse(str(user_count()))


urlpatterns = []


class Closing(TestCase):
    @classmethod
    def setUpTestData(cls):
        User.objects.create(username="alice")

    def test_the_pages_way(self):
        response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
        assert response.content == b"1" and live_scopes() == 1
        request_finished.disconnect(close_old_connections)
        try:
            response.close()  # ends the scope; request_finished still runs
        finally:
            request_finished.connect(close_old_connections)
        assert live_scopes() == 0
        assert User.objects.count() == 1

    def test_a_plain_close(self):
        response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
        response.close()
        assert live_scopes() == 0
        User.objects.count()  # what the page warns of: the connection is closed


runner = DiscoverRunner(verbosity=0)
databases = runner.setup_databases()
try:
    suite = unittest.TestSuite([Closing(sys.argv[3])])  # one each: a closed one stays closed
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
finally:
    runner.teardown_databases(databases)
"""


def _run(tmp_path: Path, test: str) -> str:
    argv = [str(tmp_path / f"{test}.sqlite3"), str(tmp_path / f"{test}-test.sqlite3"), test]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=120
    )
    return done.stdout + done.stderr


def test_a_testcase_closes_a_response_with_close_old_connections_disconnected(
    tmp_path: Path,
) -> None:
    out = _run(tmp_path, "test_the_pages_way")
    assert "test_the_pages_way (__main__.Closing.test_the_pages_way) ... ok" in out, out
    out = _run(tmp_path, "test_a_plain_close")  # what the page warns of
    assert "Cannot operate on a closed database" in out, out
