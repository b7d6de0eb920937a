"""The plugin's key-value store: its own keys, private to the plugin.

Writes are buffered during the call and committed only if the handler returns; reads
see the call's own writes. Reads are optimistic: when a key the call read changes
before the call commits, the host runs the handler again on the new value.
"""

from __future__ import annotations

import json as _json
from typing import Any, List, Optional, Union

from wit_world.imports import host as _host


def get(key: str) -> Optional[bytes]:
    """The value stored at ``key``, or ``None``."""
    return _host.kv_get(key)


def set(key: str, value: Union[bytes, bytearray, memoryview, str]) -> None:  # noqa: A001 (mirrors the contract)
    """Stores ``value`` (``bytes``, ``bytearray``, ``memoryview``, or ``str`` stored as
    UTF-8) at ``key``. Any other type raises ``TypeError``: :func:`set_json` stores
    other values."""
    if isinstance(value, str):
        _host.kv_set(key, value.encode("utf-8"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _host.kv_set(key, bytes(value))
    else:
        # `bytes(5)` is five NUL bytes and `bytes([1, 2])` two bytes: a number or a list
        # would be stored as something other than what the handler meant.
        raise TypeError(
            f"kv.set stores bytes or str, not {type(value).__name__}: "
            "use kv.set_json to store it as JSON"
        )


def delete(key: str) -> None:
    """Removes ``key``; removing a missing key is not an error."""
    _host.kv_delete(key)


def keys(prefix: str = "") -> List[str]:
    """The keys starting with ``prefix``, sorted."""
    return _host.kv_keys(prefix)


def get_text(key: str, default: Optional[str] = None) -> Optional[str]:
    """The text stored at ``key`` (UTF-8; bytes that are not become U+FFFD), or ``default``
    when there is none."""
    stored = _host.kv_get(key)
    return default if stored is None else stored.decode("utf-8", errors="replace")


def get_json(key: str, default: Any = None) -> Any:
    """The JSON value stored at ``key``, or ``default`` when there is none.

    A stored value that is not JSON raises ``Reject``: retrying would not change it.
    """
    stored = _host.kv_get(key)
    if stored is None:
        return default
    try:
        return _json.loads(stored)
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, or nested too deeply
        from . import Reject  # the package imports this module before defining it

        raise Reject(f"invalid JSON stored at key {key!r}: {error}") from None


def set_json(key: str, value: Any) -> None:
    """Stores ``value`` encoded as JSON at ``key``.

    A value JSON cannot encode (a ``set``, an object, a cycle, ``NaN``) raises ``Reject``, as in
    the Rust SDK: retrying would not change it.
    """
    from . import _encode_json  # the package imports this module before defining it

    _host.kv_set(key, _encode_json(value, f"cannot serialise the value for key {key!r}"))
