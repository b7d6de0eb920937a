"""@@NAME@@: a Switchyard plugin in Python."""

import switchyard
from switchyard import BatchHandler, Event, Handler, Reject, kv  # noqa: F401 (the exports)


@switchyard.handler(subscriptions=["greeting.requested"], name="@@NAME@@", version="0.1.0")
def handle(event: Event) -> None:
    request = event.json()
    if not isinstance(request, dict):
        raise Reject('a greeting request is a JSON object, such as {"name": "Ada"}')
    who = request.get("name")
    if not isinstance(who, str) or not who:
        raise Reject("a greeting needs a name")
    count = kv.get_json(f"greeted/{who}", 0) + 1
    kv.set_json(f"greeted/{who}", count)
    switchyard.emit("greeting.sent", {"text": f"Hello, {who}!", "count": count}, subject=who)
