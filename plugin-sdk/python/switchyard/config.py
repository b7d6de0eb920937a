"""The plugin's configuration: the ``[config]`` table of its sidecar, read-only."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from wit_world.imports import host as _host

T = TypeVar("T")


def get(key: str, default: Optional[str] = None) -> Optional[str]:
    """The value of ``key`` in the sidecar's ``[config]`` table, or ``default``."""
    value = _host.config_get(key)
    return default if value is None else value


def get_parsed(key: str, parse: Callable[[str], T], default: Optional[T] = None) -> Optional[T]:
    """The value of ``key`` passed through ``parse`` (``int``, ``float``, …), or ``default``
    when the sidecar does not set it. A value ``parse`` refuses (``ValueError`` or
    ``TypeError``) raises ``Reject`` naming the key and the value, as the Rust SDK's
    ``config::get_parsed`` does: once the operator fixes the sidecar, the dead letters
    can be replayed."""
    value = _host.config_get(key)
    if value is None:
        return default
    try:
        return parse(value)
    except (ValueError, TypeError) as error:
        from . import Reject  # the package imports this module before defining it

        raise Reject(f"invalid config {key} = {value!r}: {error}") from None
