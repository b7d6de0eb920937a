// Example plugin in JavaScript: a receipt for every set of generated tickets.
//
// Subscribes to `tickets.generated` (emitted by `ticketing`). Keeps the receipt at KV key
// `receipt/<order_id>` (JSON) and emits `receipt.issued` with it, subject the order id.
// A receipt already kept is not issued again, so a redelivery is harmless. Tickets
// without an order id are rejected.
import { handler as define, kv, emit, log, Reject } from "./switchyard.js";

export const { handler, batchHandler } = define({
  name: "receipts",
  version: "0.1.0",
  subscriptions: ["tickets.generated"],
  handle(event) {
    const tickets = event.json();
    if (!tickets.order_id) throw new Reject("tickets without an order_id");
    const key = `receipt/${tickets.order_id}`;
    if (kv.get(key) !== undefined) return;
    const receipt = {
      order_id: tickets.order_id,
      email: tickets.email,
      tickets: tickets.tickets ?? [],
      issued_for: event.id,
    };
    kv.setJson(key, receipt);
    emit("receipt.issued", receipt, { subject: tickets.order_id, partitionKey: tickets.order_id });
    log.info(`receipt for ${tickets.order_id}: ${receipt.tickets.length} tickets`);
  },
});
