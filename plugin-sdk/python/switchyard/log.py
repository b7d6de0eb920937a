"""Structured log lines in the host's log, with the plugin's name.

``print`` works too (each line lands in the host's log as ``stdout``); these functions
add a level.
"""

from __future__ import annotations

from wit_world.imports import host as _host
from wit_world.imports import types as _types


def trace(message: str) -> None:
    _host.log(_types.LogLevel.TRACE, message)


def debug(message: str) -> None:
    _host.log(_types.LogLevel.DEBUG, message)


def info(message: str) -> None:
    _host.log(_types.LogLevel.INFO, message)


def warn(message: str) -> None:
    _host.log(_types.LogLevel.WARN, message)


def error(message: str) -> None:
    _host.log(_types.LogLevel.ERROR, message)
