"""Write Switchyard event-handler plugins in Python.

A plugin is one function marked with :func:`handler`. The module that holds it
re-exports ``Handler`` and ``BatchHandler``, the two classes the component exports,
and is built into a component with ``componentize-py``::

    import switchyard
    from switchyard import Event, Handler, BatchHandler  # noqa: F401 (the exports)

    @switchyard.handler(subscriptions=["order.created"])
    def handle(event: Event) -> None:
        order = event.json()
        total = switchyard.kv.get_json("total", 0) + order["amount"]
        switchyard.kv.set_json("total", total)
        switchyard.emit("order.counted", {"total": total}, subject=order["id"])

Semantics, shared with every Switchyard SDK:

- Returning acknowledges the event. ``raise Retry("...")`` asks for another attempt
  later (with backoff); ``raise Reject("...")`` sends the event to the dead letters. Any
  other exception is a bug: its type, message and traceback reach the host's log, the
  plugin's ``last_error`` and the dead letter, and the event is retried as a ``trap``.
- :func:`emit` and the :mod:`switchyard.kv` writes are transactional: they are buffered
  during the call and committed only if the handler returns. Reads see the call's own
  writes.
- Delivery is at least once, so a handler that emits should be idempotent.
- The plugin sees no files, network, environment or arguments: opening a file or a
  socket fails with an ``OSError`` inside the handler. ``print`` goes to the host's log.
- Events may be handed over in batches when the operator turns it on; each event is
  still handled by the same function and keeps its own outcome.
"""

from __future__ import annotations

import datetime as _datetime
import json as _json
from typing import Any, Callable, Dict, List, Optional, Union

from componentize_py_types import Err, Ok
from wit_world.imports import host as _host
from wit_world.imports import types as _types

from . import config, kv, log, stream  # noqa: F401 (part of the package's surface)

# The component holds only the modules imported when it is built; these are imported
# lazily by the standard library on paths handlers commonly reach (`socket` needs the
# IDNA codec to report a refused connection as the `OSError` it is).
import encodings.idna  # noqa: F401,E402
import linecache as _linecache  # noqa: E402

# A traceback's source lines would be read from files, and a plugin has none: every
# traceback would count as attempts to open files. Tracebacks name file and line.
_linecache.updatecache = lambda filename, module_globals=None: []

__all__ = [
    "BatchHandler",
    "Delivery",
    "Event",
    "Handler",
    "Reject",
    "Retry",
    "cancel_scheduled",
    "config",
    "emit",
    "handler",
    "kv",
    "log",
    "stream",
]


class Retry(Exception):
    """A transient failure: the host retries the event later, with backoff."""


class Reject(Exception):
    """A permanent failure: the host sends the event to the dead letters at once."""


class Delivery:
    """Where this call stands in the delivery of its event."""

    __slots__ = ("attempt", "max_attempts", "sequence")

    def __init__(self, delivery: _types.Delivery) -> None:
        self.attempt: int = delivery.attempt
        self.max_attempts: int = delivery.max_attempts
        self.sequence: int = delivery.sequence

    @property
    def is_last_attempt(self) -> bool:
        """Whether a ``Retry`` now sends the event to the dead letters."""
        return self.attempt >= self.max_attempts

    def __repr__(self) -> str:
        return f"Delivery(attempt={self.attempt}, max_attempts={self.max_attempts}, sequence={self.sequence})"


class Event:
    """A CloudEvent as the host delivers it, with the call's :class:`Delivery`."""

    __slots__ = (
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "data",
        "extensions",
        "delivery",
    )

    def __init__(self, event: _types.Event, delivery: Optional[_types.Delivery] = None) -> None:
        self.id: str = event.id
        self.source: str = event.source
        self.type: str = event.type
        self.subject: Optional[str] = event.subject
        self.time: Optional[str] = event.time
        self.datacontenttype: Optional[str] = event.datacontenttype
        self.dataschema: Optional[str] = event.dataschema
        self.data: bytes = bytes(event.data)
        self.extensions: Dict[str, str] = dict(event.extensions)
        self.delivery: Optional[Delivery] = Delivery(delivery) if delivery is not None else None

    def json(self) -> Any:
        """The data decoded as JSON. Data that does not decode, or is nested too deeply
        to decode, raises :class:`Reject`."""
        try:
            return _json.loads(self.data)
        # Nesting deeper than the interpreter's recursion limit is as permanent as a
        # syntax error: retrying the same data would fail the same way.
        except (ValueError, RecursionError) as e:
            raise Reject(f"invalid data for {self.type}: {e}") from e

    def text(self) -> str:
        """The data decoded as UTF-8. Data that does not decode raises :class:`Reject`."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"invalid data for {self.type}: {e}") from e

    def extension(self, name: str) -> Optional[str]:
        """The value of the CloudEvents extension attribute ``name``, if present."""
        return self.extensions.get(name)

    @property
    def correlation_id(self) -> Optional[str]:
        """The id shared by every event of one causal chain."""
        return self.extensions.get("correlationid")

    @property
    def causation_id(self) -> Optional[str]:
        """The id of the event whose handler emitted this one."""
        return self.extensions.get("causationid")

    @property
    def partition_key(self) -> Optional[str]:
        """The key the host orders deliveries by."""
        return self.extensions.get("partitionkey")

    @property
    def stream_version(self) -> Optional[int]:
        """The event's position in its subject's stream."""
        value = self.extensions.get("streamversion")
        return int(value) if value is not None and value.isdigit() else None

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, type={self.type!r}, subject={self.subject!r})"


def emit(
    type: str,
    data: Any = None,
    *,
    subject: Optional[str] = None,
    content_type: Optional[str] = None,
    extensions: Optional[Dict[str, str]] = None,
    partition_key: Optional[str] = None,
    expected_version: Optional[int] = None,
    delay: Union[None, float, _datetime.timedelta] = None,
    deliver_at: Union[None, str, _datetime.datetime] = None,
) -> str:
    """Emits an event, committed with the call; returns its id.

    ``data`` may be ``bytes`` (sent as they are, ``application/octet-stream`` unless
    ``content_type`` says otherwise), ``str`` (``text/plain``) or anything JSON can
    encode (``application/json``); data JSON cannot encode raises :class:`Reject`.
    ``expected_version`` makes the append conditional on the subject's stream being at
    that version. ``delay`` (seconds or a ``timedelta``) or ``deliver_at`` (an RFC 3339
    time or an aware ``datetime``) schedule the event; the returned id can be passed to
    :func:`cancel_scheduled`.
    """
    if data is None:
        body, default_type = b"", None
    elif isinstance(data, (bytes, bytearray, memoryview)):
        body, default_type = bytes(data), "application/octet-stream"
    elif isinstance(data, str):
        body, default_type = data.encode("utf-8"), "text/plain"
    else:
        body, default_type = _encode_json(data, f"cannot serialise {type}"), "application/json"
    ext = dict(extensions or {})
    if partition_key is not None:
        ext["partitionkey"] = partition_key
    if delay is not None and deliver_at is not None:
        raise ValueError("emit takes delay or deliver_at, not both")
    schedule: Optional[_types.Schedule] = None
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, _datetime.timedelta) else float(delay)
        if seconds < 0:
            raise ValueError("delay must not be negative")
        schedule = _types.Schedule_DelayMs(int(seconds * 1000))
    elif deliver_at is not None:
        if isinstance(deliver_at, _datetime.datetime):
            if deliver_at.tzinfo is None:
                raise ValueError("deliver_at needs a time zone")
            deliver_at = deliver_at.isoformat()
        schedule = _types.Schedule_At(deliver_at)
    return _host.emit(
        _types.OutgoingEvent(
            type=type,
            subject=subject,
            datacontenttype=content_type or default_type,
            data=body,
            extensions=list(ext.items()),
            expected_version=expected_version,
            schedule=schedule,
        )
    )


def _encode_json(value: Any, failure: str) -> bytes:
    """``value`` as compact JSON; a value JSON cannot encode raises :class:`Reject`.

    The same value fails the same way on every attempt, so retrying it as a bug would
    only delay the dead letter; the Rust SDK rejects it too. ``NaN`` and the infinities
    are refused too: Python would write them as ``NaN`` and ``Infinity``, which JSON
    readers in other languages refuse.
    """
    try:
        return _json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise Reject(f"{failure}: {e}") from e


def cancel_scheduled(id: str) -> bool:
    """Cancels a scheduled event by the id :func:`emit` returned; ``False`` if it has
    already fired, was cancelled, or never existed. Committed with the call."""
    return _host.cancel_scheduled(id)


HandlerFunction = Callable[[Event], None]

_registered: Dict[str, Any] = {}


def handler(
    subscriptions: List[str],
    *,
    name: str = "python-plugin",
    version: str = "0.1.0",
) -> Callable[[HandlerFunction], HandlerFunction]:
    """Marks the plugin's handler: a function taking an :class:`Event`.

    ``subscriptions`` are the plugin's default event-type patterns (``order.*``,
    ``audit.>``); an operator's sidecar may replace them. ``name`` and ``version``
    describe the plugin; the host names a loaded plugin after its file.
    """
    if isinstance(subscriptions, str):
        raise TypeError("subscriptions is a list of patterns, such as ['order.*']")

    def register(function: HandlerFunction) -> HandlerFunction:
        if "function" in _registered:
            raise RuntimeError("a plugin has one handler; found a second one")
        _registered["function"] = function
        _registered["info"] = _types.PluginInfo(name=name, version=version, subscriptions=list(subscriptions))
        return function

    return register


def _function() -> HandlerFunction:
    function = _registered.get("function")
    if function is None:
        raise RuntimeError("no handler: mark one function with @switchyard.handler(...)")
    return function


def _run(function: HandlerFunction, event: _types.Event, delivery: _types.Delivery) -> Optional[_types.HandlerError]:
    """Runs the handler and returns its outcome. A bug propagates: the runtime prints its
    traceback to stderr, where the host reads it when the call traps."""
    try:
        result = function(Event(event, delivery))
        if hasattr(result, "__await__"):
            # Nothing runs a coroutine after the call: an `async def` handler's outcome,
            # and a `Retry` or `Reject` it raises, would be lost and the event acknowledged.
            if hasattr(result, "close"):
                result.close()
            raise TypeError(
                "handle returned a coroutine: handlers are synchronous (no `async def`, no "
                "`await`), and the outcome of a coroutine would be lost"
            )
    except Retry as e:
        return _types.HandlerError_Retry(str(e) or "retry")
    except Reject as e:
        return _types.HandlerError_Reject(str(e) or "reject")
    return None


class Handler:
    """The component's ``handler`` export; re-export it from the plugin's module."""

    def describe(self) -> _types.PluginInfo:
        _function()
        return _registered["info"]

    def handle(self, event: _types.Event, delivery: _types.Delivery) -> None:
        outcome = _run(_function(), event, delivery)
        if outcome is not None:
            raise Err(outcome)


class BatchHandler:
    """The component's ``batch-handler`` export; re-export it from the plugin's module.

    Runs each event of a batch through the same handler, telling the host where each
    event's effects begin and end. A bug in one event ends the call there: the events
    before it keep their outcomes and the host runs the rest again one by one.
    """

    def handle_batch(self, items: List[Any]) -> None:
        function = _function()
        for index, item in enumerate(items):
            _host.begin_item(index)
            outcome = _run(function, item.event, item.delivery)
            _host.end_item(Err(outcome) if outcome is not None else Ok(None))

