"""The test project without perrequest in MIDDLEWARE: ``wrapped_wsgi`` wraps the whole app."""

from .settings import *  # noqa: F403
from .settings import MIDDLEWARE

MIDDLEWARE = [name for name in MIDDLEWARE if not name.startswith("perrequest.")]
PERREQUEST = None
