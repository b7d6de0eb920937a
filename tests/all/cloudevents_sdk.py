"""Drives a running host's ingest with the CloudEvents Python SDK as an independent
producer: the same events in binary, structured and batched mode, then reads the log
back and parses every stored event with the SDK's own JSON format.

Usage: python3 cloudevents_sdk.py BASE_URL

Prints one line per check ("ok ..." or "FAIL ...") and exits 1 if any check failed.
"""

import datetime
import http.client
import json
import sys
import urllib.request

from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

BASE = sys.argv[1]
FORMAT = JSONFormat()
failures = []


def check(ok, what):
    print(("ok " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def post(headers, body):
    # http.client sends exactly these headers (urllib would add a form Content-Type).
    connection = http.client.HTTPConnection(BASE.removeprefix("http://"), timeout=30)
    try:
        connection.request("POST", "/v1/events", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def kinds(mode):
    """One event of each kind of data, with ids that name the mode."""
    time = datetime.datetime(2026, 3, 1, 12, 30, 15, 250000, tzinfo=datetime.timezone.utc)
    full = {
        "type": "sdk.order.created",
        "source": "/sdk/orders",
        "id": f"{mode}-json",
        "subject": "order-7",
        "time": time,
        "datacontenttype": "application/json",
        "dataschema": "https://example.com/schemas/order.json",
        "correlationid": "flow-1",
        "partitionkey": "customer-9",
    }
    return [
        CloudEvent(attributes=full, data={"total": 12.5, "items": [1, 2], "note": "é"}),
        # No datacontenttype: the JSON format reads the data as application/json.
        CloudEvent(
            attributes={"type": "sdk.plain", "source": "/sdk", "id": f"{mode}-untyped"},
            data={"untyped": True},
        ),
        CloudEvent(
            attributes={
                "type": "sdk.bytes",
                "source": "/sdk",
                "id": f"{mode}-bytes",
                "datacontenttype": "application/octet-stream",
            },
            data=bytes([0, 1, 2, 254, 255]),
        ),
        CloudEvent(
            attributes={
                "type": "sdk.text",
                "source": "/sdk",
                "id": f"{mode}-text",
                "datacontenttype": "text/plain; charset=utf-8",
            },
            data="hello, wörld",
        ),
    ]


def send_all():
    sent = []
    for event in kinds("binary"):
        message = to_binary_event(event)
        status, _ = post(message.headers, message.body)
        check(status == 202, f"binary {event.get_id()}: {status}")
        sent.append(event)
    for event in kinds("structured"):
        message = to_structured_event(event)
        status, _ = post(message.headers, message.body)
        check(status == 202, f"structured {event.get_id()}: {status}")
        sent.append(event)
    batch = kinds("batch")
    body = b"[" + b",".join(FORMAT.write(event) for event in batch) + b"]"
    status, answer = post({"content-type": "application/cloudevents-batch+json"}, body)
    check(status == 202, f"batch of {len(batch)}: {status}")
    accepted = [entry["id"] for entry in (answer or {}).get("accepted", [])]
    check(accepted == [e.get_id() for e in batch], f"batch answer in order: {accepted}")
    sent.extend(batch)
    return sent


def refused_cases():
    # A body declared JSON that is not JSON is refused, naming the parse position.
    bad = CloudEvent(
        attributes={
            "type": "sdk.bad",
            "source": "/sdk",
            "id": "binary-bad-json",
            "datacontenttype": "application/json",
        },
        data='{"total": ',
    )
    message = to_binary_event(bad)
    status, answer = post(message.headers, message.body)
    error = (answer or {}).get("error", {})
    check(
        status == 400
        and error.get("code") == "malformed_json"
        and "line 1, column" in error.get("message", ""),
        f"binary JSON body that is not JSON: {status} {error}",
    )


def stored_events():
    status, page = 0, None
    request = urllib.request.Request(BASE + "/v1/events?type=sdk.%3E&limit=1000")
    with urllib.request.urlopen(request) as response:
        status, page = response.status, json.loads(response.read())
    check(status == 200, f"GET /v1/events: {status}")
    return {stored["event"]["id"]: stored["event"] for stored in page["events"]}


def compare(sent, stored):
    for event in sent:
        rendered = stored.get(event.get_id())
        if rendered is None:
            check(False, f"{event.get_id()} is in the log")
            continue
        back = FORMAT.read(None, json.dumps(rendered))
        expected_type = event.get_datacontenttype() or "application/json"
        pairs = [
            ("id", event.get_id(), back.get_id()),
            ("source", event.get_source(), back.get_source()),
            ("type", event.get_type(), back.get_type()),
            ("subject", event.get_subject(), back.get_subject()),
            ("time", event.get_time(), back.get_time()),
            ("datacontenttype", expected_type, back.get_datacontenttype()),
            ("dataschema", event.get_dataschema(), back.get_dataschema()),
            ("data", event.get_data(), back.get_data()),
        ]
        for name in ("correlationid", "partitionkey"):
            pairs.append((name, event.get_extension(name), back.get_extension(name)))
        wrong = [f"{n}: sent {a!r}, read back {b!r}" for n, a, b in pairs if a != b]
        check(not wrong, f"{event.get_id()} round-trips" + "".join("; " + w for w in wrong))
        if event.get_datacontenttype() is None:
            check("data" in rendered, f"{event.get_id()} is shown as JSON data: {rendered}")


sent = send_all()
refused_cases()
compare(sent, stored_events())
check(len(sent) == 12, f"{len(sent)} events sent")
sys.exit(1 if failures else 0)
