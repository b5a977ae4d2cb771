"""perrequest: a cache that lives and dies with the request.

A per-request memo store held in a ``ContextVar``, opened by a middleware or
``request_scope`` and cleared the moment the request ends, so a memo can
never grow with the life of the process.
"""

from ._shared import SharedComputationError
from ._stats import FunctionStats, ScopeStats
from ._typing import (
    BoundMemoizedFunction,
    CacheInfo,
    MemoizedFunction,
    SharedCacheInfo,
    SharedMemoizedFunction,
)
from .batch import AsyncBatchLoader, BatchLoader, request_batch
from .errors import NoActiveScope, PerRequestError, ScopeClosed, UnhashableArguments
from .memo import request_memo
from .scope import (
    add_scope_listener,
    bind_scope,
    current_store,
    in_request_scope,
    remove_scope_listener,
    request_scope,
)
from .scope import delete as delete
from .scope import get as get
from .scope import get_or_set as get_or_set
from .scope import set as set
from .store import DEFAULT_MAX_ENTRIES, MemoStore

__version__ = "0.1.0"

# get, set, get_or_set and delete are used as perrequest.get(...): they stay out
# of __all__ so that `from perrequest import *` never shadows the built-in set.
__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "AsyncBatchLoader",
    "BatchLoader",
    "BoundMemoizedFunction",
    "CacheInfo",
    "FunctionStats",
    "MemoStore",
    "MemoizedFunction",
    "NoActiveScope",
    "PerRequestError",
    "ScopeClosed",
    "ScopeStats",
    "SharedCacheInfo",
    "SharedComputationError",
    "SharedMemoizedFunction",
    "UnhashableArguments",
    "add_scope_listener",
    "bind_scope",
    "current_store",
    "in_request_scope",
    "remove_scope_listener",
    "request_batch",
    "request_memo",
    "request_scope",
]
