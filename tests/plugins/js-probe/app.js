// Test plugin in JavaScript: one behaviour per event type `probe.<kind>`.
//
// - `count`: increments KV `count` and emits `probe.counted` with the new count.
// - `retry` / `reject`: throws `Retry("not yet")` / `Reject("never")`.
// - `crash`: a bug, an uncaught `TypeError`.
// - `loop`: loops until the host stops it.
// - `fetch`: fetches http://127.0.0.1:9/ and stores what happened at KV `fetch`.
// - `json`: decodes a list of `{"n": …}` objects and stores their count and sum at KV `json`.
// - `emit-options`: emits with every option of the contract (see the test).
// - `stdio`: logs a line and stores the clock and two random numbers at KV `stdio`.
// - `async`: writes KV `async`, then returns a promise that would throw `Retry`.
// - `bad-json`: stores bytes that are not JSON at KV `bad`, then reads them with `getJson`.
// - `config`: stores at KV `config` the config `limit` parsed as a number and the text of
//   a KV value holding `héllo` and a byte that is not UTF-8.
// - `bad-config`: parses the config `bad` as a number.
// - `read-all`: stores at KV `read` how many events `stream.readAll("ledger")` returned.
// - `read-at-most`: reads the stream `ledger` with `stream.readAtMost("ledger", 2)`.
// - `bad-value`: stores `undefined` with `kv.setJson`, which JSON cannot encode.
import { handler as define, kv, emit, config, stream, Retry, Reject } from "./switchyard.js";

export const { handler, batchHandler } = define({
  name: "js-probe",
  subscriptions: ["probe.>"],
  handle(event) {
    const kind = event.type.slice("probe.".length);
    if (kind === "count") {
      const count = (kv.getJson("count") ?? 0) + 1;
      kv.setJson("count", count);
      emit("probe.counted", { count, id: event.id });
    } else if (kind === "retry") {
      throw new Retry("not yet");
    } else if (kind === "reject") {
      throw new Reject("never");
    } else if (kind === "crash") {
      const order = JSON.parse("null");
      kv.set("id", order.id);
    } else if (kind === "loop") {
      for (;;) {}
    } else if (kind === "fetch") {
      let outcome = "pending";
      fetch("http://127.0.0.1:9/").then(
        () => (outcome = "allowed"),
        (e) => (outcome = `${e.name}: ${e.message}`),
      );
      kv.set("fetch-started", "yes");
      // A handler is synchronous: the answer arrives after the call, so record the
      // refusal the host counts, and the immediate outcome.
      kv.set("fetch", outcome);
    } else if (kind === "json") {
      const items = event.json();
      kv.setJson("json", { items: items.length, total: items.reduce((sum, item) => sum + item.n, 0) });
    } else if (kind === "emit-options") {
      emit("probe.plain", new Uint8Array([0, 1]), {
        subject: "s-1",
        partitionKey: "k-1",
        extensions: { region: "eu" },
        expectedVersion: 3,
      });
      emit("probe.later", "text", { delay: 1500 });
      emit("probe.at", { a: 1 }, { deliverAt: new Date(Date.now() + 86_400_000) });
    } else if (kind === "stdio") {
      console.log("hello from javascript");
      kv.setJson("stdio", { time: Date.now(), random: [Math.random(), Math.random()] });
    } else if (kind === "bad-json") {
      kv.set("bad", "not json");
      kv.getJson("bad");
    } else if (kind === "config") {
      kv.set("text", new Uint8Array([0x68, 0xc3, 0xa9, 0x6c, 0x6c, 0x6f, 0x20, 0xff]));
      kv.setJson("config", [config.getParsed("limit", Number), kv.getText("text")]);
    } else if (kind === "bad-config") {
      config.getParsed("bad", Number);
    } else if (kind === "read-all") {
      kv.setJson("read", stream.readAll("ledger").events.length);
    } else if (kind === "read-at-most") {
      stream.readAtMost("ledger", 2);
    } else if (kind === "bad-value") {
      kv.setJson("nan", undefined);
    } else if (kind === "async") {
      kv.set("async", "written");
      return (async () => {
        await null;
        throw new Retry("too late to be seen");
      })();
    }
  },
});
