"""Example plugin in Python: loyalty points for every completed payment.

Subscribes to ``payment.completed``. Each payment earns its customer 10 points per
ticket, kept at KV key ``points/<email>`` (a JSON number), and announces the new balance
as ``loyalty.points-awarded`` (subject: the customer's email). The payment's order id
is remembered at ``order/<id>``, so a redelivered payment never earns twice. A payment
without an ``email`` is rejected: no attempt could ever succeed.
"""

import switchyard
from switchyard import BatchHandler, Event, Handler, Reject, kv  # noqa: F401 (the exports)

POINTS_PER_TICKET = 10


@switchyard.handler(subscriptions=["payment.completed"], name="loyalty", version="0.1.0")
def handle(event: Event) -> None:
    payment = event.json()
    email = payment.get("email")
    if not email:
        raise Reject("payment without an email")
    order_key = f"order/{payment.get('order_id', event.id)}"
    if kv.get(order_key) is not None:
        return  # already counted: stay idempotent
    earned = POINTS_PER_TICKET * int(payment.get("quantity", 1))
    balance = kv.get_json(f"points/{email}", 0) + earned
    kv.set_json(f"points/{email}", balance)
    kv.set(order_key, event.id)
    switchyard.emit(
        "loyalty.points-awarded",
        {"email": email, "earned": earned, "balance": balance},
        subject=email,
        partition_key=email,
    )
    switchyard.log.info(f"{email} earned {earned} points, balance {balance}")
