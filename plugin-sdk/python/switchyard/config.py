"""The plugin's configuration: the ``[config]`` table of its sidecar, read-only."""

from __future__ import annotations

from typing import Optional

from wit_world.imports import host as _host


def get(key: str, default: Optional[str] = None) -> Optional[str]:
    """The value of ``key`` in the sidecar's ``[config]`` table, or ``default``."""
    value = _host.config_get(key)
    return default if value is None else value
