"""The Redis side of ``RedisCache``: its own pools, its scripts, its encodings.

A cache must answer fast or not at all, so ``RedisCache`` does not use the user's
client, whose defaults retry for seconds against a closed port: it opens a pool of
its own with the same connection settings, without retries, in bytes. Connecting
(or waiting for a pooled connection) and the reply get half ``op_timeout`` each, so
a busy pool says so ("No connection available.") before the operation times out
(an async command runs under ``asyncio.timeout(op_timeout)`` besides).

Keys are the SHA-256 of the canonical JSON of the call's key, whatever the value
serializer: pickle is not canonical (a set pickles in hash order, which differs
between processes). Values are JSON (loading runs no code), or pickle signed with
HMAC-SHA256 over key and bytes: a value written without the secret, or copied from
another key, does not verify and is a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import re
import sys
from collections.abc import Callable
from typing import Any

try:
    import redis
    import redis.asyncio
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # name the extra to install
    from ._extras import missing_extra

    missing_extra(exc, "perrequest.redis", "redis", "redis")

from ._checks import KWARGS
from ._redis_scripts import CLAIM, DROP, EXTEND, GEN, LOCK, RENEW, STORE
from ._signals import is_time_limit

# Connection settings that say where the server is and who connects; the
# rest (timeouts, retries, decoding, protocol, pool behaviour) is the cache's own.
_PASSED = frozenset(
    (
        "host", "port", "path", "db", "username", "password", "credential_provider",
        "client_name", "socket_keepalive", "socket_keepalive_options", "socket_read_size",
    )
)  # fmt: skip
# What makes a new connection's handshake cost round trips the command's op_timeout
# pays for (HELLO 3, and CLIENT SETINFO, with maintenance notifications, after it):
# RESP2 and no SETINFO leave AUTH and SELECT, when asked for. Otherwise a server a
# third of op_timeout away is never reached by an async cache (each new connection is
# cancelled in its handshake, and the next one is new again).
_NO_HANDSHAKE = ("driver_info", "lib_name", "lib_version")  # redis-py 8; 5 to 7
_EXHAUSTED = ("Too many connections", "No connection available.")
# What a Redis command that fails raises (redis-py's errors, sockets, a loop gone): the tier
# fails open. Any other Exception is a signal handler's (Celery's soft limit): it goes on.
FAILURES = (redis.RedisError, OSError, EOFError, RuntimeError, ValueError)
_SYNC_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool)
_ASYNC_POOLS = (redis.asyncio.ConnectionPool, redis.asyncio.BlockingConnectionPool)


def check_client(client: object) -> bool:
    """Whether ``client`` is async; TypeError for anything but a ``redis.Redis`` or a
    ``redis.asyncio.Redis`` on a plain connection pool."""
    if isinstance(client, redis.asyncio.Redis):
        pools: tuple[type, ...] = _ASYNC_POOLS
    elif isinstance(client, redis.Redis):
        pools = _SYNC_POOLS
    else:
        raise TypeError(
            f"RedisCache(client) takes a redis.Redis (for sync functions) or a "
            f"redis.asyncio.Redis (for async functions), not {type(client).__name__}. "
            "Valkey servers take the same clients; Redis Cluster is not supported."
        )
    if type(client.connection_pool) not in pools:
        raise TypeError(
            f"RedisCache(client): a client on a {type(client.connection_pool).__name__} is "
            "not supported (Sentinel and custom pools are not); give a client made with "
            "redis.Redis(host=..., ...) or redis.Redis.from_url(...)."
        )
    return isinstance(client, redis.asyncio.Redis)


def exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` says the pool has no free connection: this process is busy, and
    Redis may well be fine."""
    return isinstance(exc, redis.ConnectionError) and str(exc) in _EXHAUSTED


class Conn:
    """A pool of the cache's own, like ``client``'s (blocking if it is, with as many
    connections), with its client and scripts."""

    def __init__(self, client: Any, op_timeout: float, sync: bool) -> None:
        module: Any = redis if sync else redis.asyncio
        pool, timeout = client.connection_pool, op_timeout / 2
        settings = {
            k: v for k, v in pool.connection_kwargs.items() if k in _PASSED or k.startswith("ssl_")
        }
        settings.update({k: None for k in _NO_HANDSHAKE if k in pool.connection_kwargs})
        kind = module.ConnectionPool
        if isinstance(pool, (redis.BlockingConnectionPool, redis.asyncio.BlockingConnectionPool)):
            kind = module.BlockingConnectionPool
            settings["timeout"] = timeout if pool.timeout is None else min(pool.timeout, timeout)
        # The same kind of connection (TCP, TLS, Unix socket) in ``module``; a class of the
        # user's own is kept (on an async client, the sync admin pool then fails open).
        connection_class = getattr(module.connection, pool.connection_class.__name__, None)
        own = kind(
            connection_class=connection_class or pool.connection_class,
            max_connections=pool.max_connections,
            retry=(Retry if sync else AsyncRetry)(NoBackoff(), 0),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=False,
            protocol=2,  # every server speaks it without a HELLO
            **settings,
        )
        self.client = module.Redis(connection_pool=own)
        self.claim, self.extend, self.store, self.drop, self.renew = (
            _script(self.client, body, sync) for body in (CLAIM, EXTEND, STORE, DROP, RENEW)
        )


# A script by its SHA-1, or, on a server that does not have it yet (a new one, a
# restarted one), by its text, which loads it: two round trips at most within the
# command's op_timeout (redis-py's Script sends EVALSHA, SCRIPT LOAD, then EVALSHA).
def _script(client: Any, body: str, sync: bool) -> Callable[..., Any]:  # async: awaitable
    sha = hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()

    def run(keys: list[Any], args: list[Any]) -> Any:
        try:
            return client.evalsha(sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(body, len(keys), *keys, *args)

    async def run_async(keys: list[Any], args: list[Any]) -> Any:
        try:
            return await client.evalsha(sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(body, len(keys), *keys, *args)

    return run if sync else run_async


def wrong_type(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a key that holds another type than a string
    (written by someone else): that key's problem, not the server's."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE")


def scan_delete(conn: Conn, base: str) -> int:
    """Delete the values of the function whose keys start with ``base`` (one version, no
    colon, then a SHA-256: never another namespace's key that starts alike) and their
    locks, a SCAN page at a time, after writing the function's generation anew: a
    computation in flight stores nothing, and a value stored before is there all along
    the SCAN, which finds it; how many keys (values and locks)."""
    conn.renew(keys=[base + GEN], args=[os.urandom(9).hex()])
    pattern = re.sub(r"([\\*?\[\]])", r"\\\1", base) + "*"  # glob-escaped
    wanted = re.compile(re.escape(base.encode()) + rb"[^:]+:[0-9a-f]{64}(?::lock)?\Z").match
    deleted, cursor = 0, None
    while cursor != 0:
        cursor, keys = conn.client.scan(cursor=cursor or 0, match=pattern, count=1000)
        doomed = [k for k in keys if wanted(k)]
        if doomed:
            deleted += conn.client.unlink(*doomed)
    return deleted


def unlink(conn: Conn, key: str, lock_ms: int) -> int:
    """Delete a value and its lock, and write its generation anew, at once; whether the
    value was there."""
    return int(conn.drop(keys=[key + GEN, key + LOCK, key], args=[lock_ms, os.urandom(9).hex()]))


# -- encodings ------------------------------------------------------------------------

_MAC_BYTES = 32  # HMAC-SHA256
_MIN_SECRET = 16


class BadValue(Exception):
    """A value in Redis that does not verify: treated as a miss (as one that does not
    decode, whatever the decoder raises)."""


def _key_default(obj: object) -> object:
    # JSON objects never come from arguments (dicts are unhashable), so these
    # two markers cannot collide with any argument's encoding.
    if obj is KWARGS:  # a call with keyword arguments: (KWARGS, args, kwargs items)
        return {"kwargs": 1}
    if isinstance(obj, type):  # typed=True tags, and classes as arguments
        if not _found_by_name(obj):  # a class defined in a function, type(), namedtuple()
            raise TypeError(
                f"class {obj.__module__}.{obj.__qualname__} is not found by that name (made "
                "in a function or at run time, as others of that name may be): not unique"
            )
        return {"type": f"{obj.__module__}.{obj.__qualname__}"}
    raise TypeError(f"{type(obj).__module__}.{type(obj).__qualname__} is not a JSON type")


def _found_by_name(cls: type) -> bool:
    """``module.qualname`` finds ``cls``, as pickle looks a class up (the types of modules
    built into the interpreter, ``NoneType``, ``sys.flags``' type, are one of a kind though
    their module may not name them)."""
    if cls.__module__ in sys.builtin_module_names:  # builtins, sys: types one of a kind
        return True
    found: object = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


_keys = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=_key_default)
_values = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# What JSONEncoder.encode builds on every call, built once: half the cost of a key, which
# the Redis tier's first-read target (1.3x a bare GET) needs. The same C code, so the
# same text; JSONEncoder.encode where the C accelerator is missing.
_make = getattr(json.encoder, "c_make_encoder", None)
_one_shot = (
    None
    if _make is None
    else _make(None, _key_default, json.encoder.encode_basestring_ascii, None, ":", ",",
               False, False, True)
)  # fmt: skip


def digest(call_key: object) -> str:
    """SHA-256 (hex) of the canonical JSON of a call's key; TypeError, ValueError (or
    RecursionError, nested too deep) if it has none."""
    text = _keys.encode(call_key) if _one_shot is None else "".join(_one_shot(call_key, 0))
    return hashlib.sha256(text.encode()).hexdigest()


def key_problem(value: object) -> str | None:
    """Why ``value`` cannot be part of a Redis key, or None if it can."""
    try:
        _keys.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)
    return None


def _check_secret(serializer: object, secret: object) -> bytes | None:
    """``RedisCache(serializer=..., secret=...)``: the secret as bytes, or None (JSON only)."""
    if serializer not in ("json", "pickle"):
        raise ValueError(
            f"RedisCache(serializer=...) must be 'json' or 'pickle', not {serializer!r}"
        )
    if secret is None:
        if serializer == "pickle":
            raise ValueError(
                "RedisCache(serializer='pickle') needs secret=: loading a pickle runs code, "
                "so anyone able to write to Redis could run code in every process reading "
                "it. With a secret, values are signed (HMAC-SHA256) and a value that does "
                "not verify is a miss. Pass secret= (e.g. from secrets.token_hex(32), kept "
                "out of the code), or keep serializer='json'."
            )
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"RedisCache(secret=...) must be str or bytes, not {type(secret).__name__}")
    if len(secret) < _MIN_SECRET:
        raise ValueError(
            f"RedisCache(secret=...) must be at least {_MIN_SECRET} bytes; generate one with "
            "secrets.token_hex(32)"
        )
    return secret


class Codec:
    """Values to bytes and back, signed (HMAC-SHA256 over key and bytes) with a secret.
    ``loads`` raises ``BadValue`` for a bad signature, or whatever the decoder raises."""

    __slots__ = ("decode", "encode", "name", "secret")

    def __init__(self, serializer: str, secret: object) -> None:
        self.name, self.secret = serializer, _check_secret(serializer, secret)
        self.encode: Callable[[Any], bytes] = _json_dumps
        self.decode: Callable[[bytes], Any] = json.loads
        if serializer == "pickle":
            self.encode, self.decode = _pickle_dumps, pickle.loads

    def dumps(self, value: Any, key: str) -> bytes:
        data = self.encode(value)
        return data if self.secret is None else _mac(self.secret, key, data) + data

    def loads(self, raw: bytes, key: str) -> Any:
        if self.secret is None:
            return self.decode(raw)
        data = raw[_MAC_BYTES:]
        if not hmac.compare_digest(raw[:_MAC_BYTES], _mac(self.secret, key, data)):
            raise BadValue("failed its signature check")
        return self.decode(data)


def _json_dumps(value: Any) -> bytes:
    # A lone surrogate (a file name through os.fsdecode) is a str too: json.loads of
    # bytes decodes with "surrogatepass", so encode likewise.
    return _values.encode(value).encode("utf-8", "surrogatepass")


def _pickle_dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # PicklingError, or the TypeError/AttributeError pickle raises
        if is_time_limit(exc):  # a soft time limit: the task's
            raise
        raise TypeError(f"{type(exc).__name__}: {exc}") from None


def _mac(secret: bytes, key: str, data: bytes) -> bytes:
    return hmac.digest(secret, key.encode() + b"\n" + data, "sha256")
