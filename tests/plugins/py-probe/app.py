"""Test plugin in Python: one behaviour per event type `probe.<kind>`.

- `count`: increments KV `count` and emits `probe.counted` with the new count.
- `retry` / `reject`: raises `Retry("not yet")` / `Reject("never")`.
- `crash`: a bug, an uncaught `KeyError`.
- `loop`: loops until the host stops it.
- `file`, `socket`, `lookup`: tries to read `/etc/passwd`, to connect to 127.0.0.1:9
  and to resolve a name; stores what happened at KV `file`, `socket`, `lookup`.
- `json`: decodes a list of `{"n": …}` objects and stores their count and sum at KV `json`.
- `emit-options`: emits with every option of the contract (see the test).
- `stdio`: prints a line and stores the clock and two random numbers at KV `stdio`.
- `async`: writes KV `async`, then returns a coroutine that would raise `Retry`.
- `bad-json`: stores bytes that are not JSON at KV `bad`, then reads them with `get_json`.
- `config`: stores at KV `config` the config `limit` parsed as an integer and the text of
  a KV value holding `héllo` and a byte that is not UTF-8.
- `bad-config`: parses the config `bad` as an integer.
- `read-all`: stores at KV `read` how many events `stream.read_all("ledger")` returned.
- `read-at-most`: reads the stream `ledger` with `stream.read_at_most("ledger", 2)`.
- `bad-value`: stores `NaN` with `kv.set_json`, which JSON cannot encode.
"""

import datetime
import random
import socket
import time

import switchyard
from switchyard import BatchHandler, Event, Handler, Reject, Retry, kv  # noqa: F401


def attempt(key, action):
    try:
        action()
        kv.set(key, "allowed")
    except OSError as e:
        kv.set(key, f"{type(e).__name__}: {e}")


def read_file():
    with open("/etc/passwd") as f:
        f.read()


@switchyard.handler(subscriptions=["probe.>"], name="py-probe")
def handle(event: Event) -> None:
    kind = event.type.removeprefix("probe.")
    if kind == "count":
        count = kv.get_json("count", 0) + 1
        kv.set_json("count", count)
        switchyard.emit("probe.counted", {"count": count, "id": event.id})
    elif kind == "retry":
        raise Retry("not yet")
    elif kind == "reject":
        raise Reject("never")
    elif kind == "crash":
        orders = {}
        print(orders["missing"])
    elif kind == "loop":
        while True:
            pass
    elif kind == "file":
        attempt("file", read_file)
    elif kind == "socket":
        attempt("socket", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
    elif kind == "lookup":
        attempt("lookup", lambda: socket.getaddrinfo("example.com", 80))
    elif kind == "json":
        items = event.json()
        kv.set_json("json", {"items": len(items), "total": sum(item["n"] for item in items)})
    elif kind == "emit-options":
        switchyard.emit(
            "probe.plain",
            b"\x00\x01",
            subject="s-1",
            partition_key="k-1",
            extensions={"region": "eu"},
            expected_version=3,
        )
        switchyard.emit("probe.later", "text", delay=1.5)
        tomorrow = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
        switchyard.emit("probe.at", {"a": 1}, deliver_at=tomorrow)
    elif kind == "stdio":
        print("hello from python")
        kv.set_json("stdio", {"time": time.time(), "random": [random.random(), random.random()]})
    elif kind == "bad-json":
        kv.set("bad", b"\xffnot json")
        kv.get_json("bad")
    elif kind == "config":
        kv.set("text", b"h\xc3\xa9llo \xff")
        kv.set_json("config", [switchyard.config.get_parsed("limit", int), kv.get_text("text")])
    elif kind == "bad-config":
        switchyard.config.get_parsed("bad", int)
    elif kind == "read-all":
        kv.set_json("read", len(switchyard.stream.read_all("ledger").events))
    elif kind == "read-at-most":
        switchyard.stream.read_at_most("ledger", 2)
    elif kind == "bad-value":
        kv.set_json("nan", float("nan"))
    elif kind == "async":
        kv.set("async", "written")

        async def later():
            raise Retry("too late to be seen")

        return later()
