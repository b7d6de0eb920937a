// @@NAME@@: a Switchyard plugin in JavaScript.
import { handler as define, kv, emit, Reject } from "./switchyard.js";

export const { handler, batchHandler } = define({
  name: "@@NAME@@",
  version: "0.1.0",
  subscriptions: ["greeting.requested"],
  handle(event) {
    const request = event.json();
    if (request === null || typeof request !== "object" || Array.isArray(request)) {
      throw new Reject('a greeting request is a JSON object, such as {"name": "Ada"}');
    }
    const who = request.name;
    if (typeof who !== "string" || !who) throw new Reject("a greeting needs a name");
    const count = (kv.getJson(`greeted/${who}`) ?? 0) + 1;
    kv.setJson(`greeted/${who}`, count);
    emit("greeting.sent", { text: `Hello, ${who}!`, count }, { subject: who });
  },
});
