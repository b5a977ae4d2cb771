"""A Django project to attack perrequest's middleware with, on real servers (subprocesses).

Its own database (sessions, auth) and middleware order, so it never runs in the test
process: ``asgi.py`` and ``wsgi.py`` configure it, migrate a SQLite file named by
``ATTACK_DB`` and serve it. ``ATTACK_ORDER`` picks the order of ``MIDDLEWARE``:
``first`` (perrequest first, as documented), ``sync-below`` (first, above a sync-only
middleware: under ASGI Django runs it in a thread) or ``after`` (below GZip, ConditionalGet,
the whole-site cache, sessions and auth).
"""
