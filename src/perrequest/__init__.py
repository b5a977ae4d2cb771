"""perrequest: a cache that lives and dies with the request.

A per-request memo store held in a ``ContextVar``, opened by a middleware or
``request_scope`` and cleared the moment the request ends, so a memo can
never grow with the life of the process.
"""

from .errors import NoActiveScope, PerRequestError, ScopeClosed, UnhashableArguments
from .memo import CacheInfo, SharedCacheInfo, request_memo
from .scope import bind_scope, current_store, in_request_scope, request_scope
from .scope import get as get
from .scope import get_or_set as get_or_set
from .scope import set as set
from .store import DEFAULT_MAX_ENTRIES, MemoStore, ScopeStats

__version__ = "0.1.0"

# get, set and get_or_set are used as perrequest.get(...): they stay out of
# __all__ so that `from perrequest import *` never shadows the built-in set.
__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "CacheInfo",
    "MemoStore",
    "NoActiveScope",
    "PerRequestError",
    "ScopeClosed",
    "ScopeStats",
    "SharedCacheInfo",
    "UnhashableArguments",
    "bind_scope",
    "current_store",
    "in_request_scope",
    "request_memo",
    "request_scope",
]
