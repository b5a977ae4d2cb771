"""The Redis tier's encodings: a call's key to a Redis key, a value to bytes and back.

Keys are the canonical JSON of what the request store keys the call by (the
arguments, or what ``key=`` returned): no spaces, ASCII only, floats as
``repr`` gives them, never ``repr()`` of an object. JSON is the key's form
whatever the value serializer: pickle is not canonical (a set pickles in hash
order, and string hashes differ from process to process), so keys built from
it would not be shared. The JSON is hashed with SHA-256.

Values are JSON by default: loading JSON runs no code. Pickle only with a
secret. With a secret, every value is signed with HMAC-SHA256 over its Redis
key and its bytes: a value written without the secret, or copied from another
key, does not verify and is a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
from collections.abc import Callable
from typing import Any

from ._keys import KWARGS

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
        if "<locals>" in obj.__qualname__:  # every class made by that function has the name
            raise TypeError(f"class {obj.__qualname__} is defined in a function: not unique")
        return {"type": f"{obj.__module__}.{obj.__qualname__}"}
    raise TypeError(f"{type(obj).__module__}.{type(obj).__qualname__} is not a JSON type")


_keys = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=_key_default)
_values = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def digest(call_key: object) -> str:
    """SHA-256 (hex) of the canonical JSON of a call's key; TypeError, ValueError (or
    RecursionError, nested too deep) if it has none."""
    return hashlib.sha256(_keys.encode(call_key).encode()).hexdigest()


def key_problem(value: object) -> str | None:
    """Why ``value`` cannot be part of a Redis key, or None if it can."""
    try:
        _keys.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)
    return None


def name_problem(fn: object) -> str | None:
    """Why ``fn`` cannot name its Redis keys, or None. The keys hold ``module.qualname``,
    so a callable whose name others share would share their values: every lambda is
    ``<lambda>``; a partial or a callable object has only its class's name."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return f"a {type(fn).__name__} object has no __qualname__ of its own"
    if "<lambda>" in qualname:
        return "every lambda is named <lambda>"
    return None


def check_secret(serializer: object, secret: object) -> bytes | None:
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

    def __init__(self, serializer: str, secret: bytes | None) -> None:
        self.name, self.secret = serializer, secret
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
        raise TypeError(f"{type(exc).__name__}: {exc}") from None


def _mac(secret: bytes, key: str, data: bytes) -> bytes:
    return hmac.digest(secret, key.encode() + b"\n" + data, "sha256")
