"""Subject streams: every event with a ``subject`` belongs to that subject's stream,
numbered 1, 2, 3 … in the order the host stored it (``Event.stream_version``).

Reading a stream joins the call's optimistic check: if the stream grows before the call
commits, the host runs the handler again on the new state. With
``emit(..., expected_version=page.version)`` this makes "decide on the current state,
then append" safe under concurrency.
"""

from __future__ import annotations

from typing import List

from wit_world.imports import host as _host

#: Most events one read returns; the host may return fewer.
MAX_PAGE = 1000

#: Most events ``read_all`` gathers; a longer stream is a ``Retry`` (see ``read_at_most``).
MAX_READ_ALL = 100_000


class Page:
    """Events of a stream, oldest first, and the stream's current version."""

    __slots__ = ("events", "version")

    def __init__(self, events: List["object"], version: int) -> None:
        self.events = events
        self.version = version

    def __repr__(self) -> str:
        return f"Page(events={len(self.events)}, version={self.version})"


def read(subject: str, after: int = 0, limit: int = MAX_PAGE) -> Page:
    """Up to ``limit`` events of ``subject``'s stream with a version above ``after``."""
    from . import Event

    page = _host.read_stream(subject, after, limit)
    return Page([Event(e) for e in page.events], page.version)


def version(subject: str) -> int:
    """The stream's current version (``0`` for a subject with no event)."""
    return _host.read_stream(subject, 0, 0).version


def read_at_most(subject: str, max_events: int) -> Page:
    """The whole stream, page by page, if it holds at most ``max_events`` events; a longer
    one raises ``Retry`` as soon as a page shows it, before the call runs out of memory
    (keep a long-lived aggregate's state in KV, or read it a page at a time)."""
    from . import Retry

    events: List[object] = []
    after = 0
    while True:
        page = read(subject, after, MAX_PAGE)
        events.extend(page.events)
        if len(events) > max_events:
            raise Retry(f"the stream of `{subject}` holds more than {max_events} events")
        if not page.events or len(events) >= page.version:
            return Page(events, page.version)
        after = page.events[-1].stream_version or (after + len(page.events))


def read_all(subject: str) -> Page:
    """The whole stream, up to ``MAX_READ_ALL`` events (see ``read_at_most``)."""
    return read_at_most(subject, MAX_READ_ALL)
