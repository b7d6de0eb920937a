// Write Switchyard event-handler plugins in JavaScript.
//
// A plugin is one function passed to `handler()`, whose result the plugin's module
// exports as `handler` and `batchHandler`, the two interfaces the component exports:
//
//     import { handler as define, kv, emit, Retry } from "./switchyard.js";
//
//     export const { handler, batchHandler } = define({
//       subscriptions: ["order.created"],
//       handle(event) {
//         const order = event.json();
//         const total = (kv.getJson("total") ?? 0) + order.amount;
//         kv.setJson("total", total);
//         emit("order.counted", { total }, { subject: order.id });
//       },
//     });
//
// Semantics, shared with every Switchyard SDK:
// - Returning acknowledges the event. `throw new Retry("...")` asks for another attempt
//   later (with backoff); `throw new Reject("...")` sends the event to the dead letters.
//   Any other exception is a bug: its name, message and stack reach the host's log, the
//   plugin's `last_error` and the dead letter, and the event is retried as a `trap`.
// - `emit` and the `kv` writes are transactional: they are buffered during the call and
//   committed only if the handler returns. Reads see the call's own writes.
// - Delivery is at least once, so a handler that emits should be idempotent.
// - The plugin sees no files and no network: `fetch` rejects inside the handler.
//   `console.log` goes to the host's log.
// - Events may be handed over in batches when the operator turns it on; each event is
//   still handled by the same function and keeps its own outcome.

import * as host from "switchyard:plugin/host@0.2.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A transient failure: the host retries the event later, with backoff. */
export class Retry extends Error {
  constructor(message) {
    super(message);
    this.name = "Retry";
  }
}

/** A permanent failure: the host sends the event to the dead letters at once. */
export class Reject extends Error {
  constructor(message) {
    super(message);
    this.name = "Reject";
  }
}

/** A CloudEvent as the host delivers it, with the call's delivery. */
export class Event {
  constructor(event, delivery) {
    this.id = event.id;
    this.source = event.source;
    this.type = event.type;
    this.subject = event.subject;
    this.time = event.time;
    this.datacontenttype = event.datacontenttype;
    this.dataschema = event.dataschema;
    this.data = event.data;
    this.extensions = Object.fromEntries(event.extensions);
    this.delivery = delivery
      ? {
          attempt: delivery.attempt,
          maxAttempts: delivery.maxAttempts,
          sequence: Number(delivery.sequence),
          isLastAttempt: delivery.attempt >= delivery.maxAttempts,
        }
      : undefined;
  }

  /** The data decoded as JSON; data that does not decode throws `Reject`. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (e) {
      if (e instanceof Reject) throw e;
      throw new Reject(`invalid data for ${this.type}: ${e.message}`);
    }
  }

  /** The data decoded as UTF-8; data that does not decode throws `Reject`. */
  text() {
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(this.data);
    } catch (e) {
      throw new Reject(`invalid data for ${this.type}: ${e.message}`);
    }
  }

  /** The value of the CloudEvents extension attribute `name`, if present. */
  extension(name) {
    return this.extensions[name];
  }

  get correlationId() {
    return this.extensions.correlationid;
  }

  get causationId() {
    return this.extensions.causationid;
  }

  get partitionKey() {
    return this.extensions.partitionkey;
  }

  /** The event's position in its subject's stream. */
  get streamVersion() {
    const value = this.extensions.streamversion;
    return value === undefined ? undefined : Number(value);
  }
}

/**
 * Emits an event, committed with the call; returns its id.
 *
 * `data` may be a `Uint8Array` (sent as it is, `application/octet-stream` unless
 * `contentType` says otherwise), a string (`text/plain`) or anything JSON can encode
 * (`application/json`); data JSON cannot encode (a `BigInt`, a cycle, a function)
 * throws `Reject`. Options: `subject`, `contentType`, `extensions`, `partitionKey`,
 * `expectedVersion` (append only if the subject's stream is at that version), and
 * `delay` (milliseconds) or `deliverAt` (an RFC 3339 time or a `Date`) to schedule it.
 */
export function emit(type, data, options = {}) {
  let body = new Uint8Array();
  let contentType;
  if (data instanceof Uint8Array) {
    body = data;
    contentType = "application/octet-stream";
  } else if (typeof data === "string") {
    body = encoder.encode(data);
    contentType = "text/plain";
  } else if (data !== undefined) {
    body = encoder.encode(encodeJson(data, `cannot serialise ${type}`));
    contentType = "application/json";
  }
  const extensions = { ...(options.extensions ?? {}) };
  if (options.partitionKey !== undefined) extensions.partitionkey = options.partitionKey;
  if (options.delay !== undefined && options.deliverAt !== undefined) {
    throw new TypeError("emit takes delay or deliverAt, not both");
  }
  let schedule;
  if (options.delay !== undefined) {
    if (!(options.delay >= 0)) throw new TypeError("delay must be milliseconds, not negative");
    schedule = { tag: "delay-ms", val: BigInt(Math.round(options.delay)) };
  } else if (options.deliverAt !== undefined) {
    const at = options.deliverAt instanceof Date ? options.deliverAt.toISOString() : options.deliverAt;
    schedule = { tag: "at", val: at };
  }
  return host.emit({
    type,
    subject: options.subject,
    datacontenttype: options.contentType ?? contentType,
    data: body,
    extensions: Object.entries(extensions),
    expectedVersion: options.expectedVersion === undefined ? undefined : BigInt(options.expectedVersion),
    schedule,
  });
}

// The same value fails the same way on every attempt, so retrying it as a bug would only
// delay the dead letter; the Rust SDK rejects it too. `JSON.stringify` returns
// `undefined` instead of throwing for a function, a symbol or `undefined`: stored or sent
// as it is, that would be the text "undefined", which no reader decodes.
function encodeJson(value, failure) {
  let text;
  try {
    text = JSON.stringify(value);
  } catch (e) {
    throw new Reject(`${failure}: ${e.message}`);
  }
  if (text === undefined) throw new Reject(`${failure}: ${kindOf(value)} is not JSON`);
  return text;
}

function kindOf(value) {
  if (value === null) return "null";
  if (value === undefined) return "undefined";
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `a ${typeof value}`;
}

/** Cancels a scheduled event by the id `emit` returned; `false` if it is gone. */
export function cancelScheduled(id) {
  return host.cancelScheduled(id);
}

/** The plugin's own key-value store. */
export const kv = {
  /** The bytes stored at `key`, or `undefined`. */
  get(key) {
    return host.kvGet(key);
  },
  /** The UTF-8 text stored at `key`, or `undefined`. */
  getText(key) {
    const value = host.kvGet(key);
    return value === undefined ? undefined : decoder.decode(value);
  },
  /**
   * The JSON value stored at `key`, or `undefined`. A stored value that is not JSON
   * throws `Reject`: retrying would not change it.
   */
  getJson(key) {
    const value = host.kvGet(key);
    if (value === undefined) return undefined;
    try {
      return JSON.parse(decoder.decode(value));
    } catch (e) {
      throw new Reject(`invalid JSON stored at key ${JSON.stringify(key)}: ${e.message}`);
    }
  },
  /**
   * Stores a `Uint8Array`, or a string as UTF-8. A value with no byte form (a number,
   * an object) throws `TypeError`: `kv.setJson` stores those.
   */
  set(key, value) {
    if (typeof value === "string") {
      host.kvSet(key, encoder.encode(value));
    } else if (value instanceof Uint8Array) {
      host.kvSet(key, value);
    } else if (ArrayBuffer.isView(value)) {
      host.kvSet(key, new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
    } else if (value instanceof ArrayBuffer) {
      host.kvSet(key, new Uint8Array(value));
    } else {
      // Guessing a byte form would store something other than what the handler meant.
      throw new TypeError(
        `kv.set stores a Uint8Array or a string, not ${kindOf(value)}: ` +
          "use kv.setJson to store it as JSON",
      );
    }
  },
  /**
   * Stores `value` encoded as JSON. A value JSON cannot encode (a `BigInt`, a cycle,
   * `undefined`, a function) throws `Reject`: retrying would not change it.
   */
  setJson(key, value) {
    const failure = `cannot serialise the value for key ${JSON.stringify(key)}`;
    host.kvSet(key, encoder.encode(encodeJson(value, failure)));
  },
  delete(key) {
    host.kvDelete(key);
  },
  /** The keys starting with `prefix`, sorted. */
  keys(prefix = "") {
    return host.kvKeys(prefix);
  },
};

/** The `[config]` table of the plugin's sidecar, read-only. */
export const config = {
  get(key, fallback) {
    return host.configGet(key) ?? fallback;
  },
  /**
   * The value of `key` passed through `parse` (`Number`, `BigInt`, `JSON.parse`, …), or
   * `fallback` when the sidecar does not set it. A value `parse` throws on, or turns into
   * `NaN`, throws `Reject` naming the key and the value, as the Rust SDK's
   * `config::get_parsed` does: once the operator fixes the sidecar, the dead letters can
   * be replayed.
   */
  getParsed(key, parse, fallback) {
    const value = host.configGet(key);
    if (value === undefined) return fallback;
    let parsed;
    try {
      parsed = parse(value);
    } catch (e) {
      throw new Reject(`invalid config ${key} = ${JSON.stringify(value)}: ${e?.message ?? e}`);
    }
    if (typeof parsed === "number" && Number.isNaN(parsed)) {
      throw new Reject(`invalid config ${key} = ${JSON.stringify(value)}: not a number`);
    }
    return parsed;
  },
};

/** Log lines with a level, in the host's log with the plugin's name. */
export const log = {
  trace: (message) => host.log("trace", String(message)),
  debug: (message) => host.log("debug", String(message)),
  info: (message) => host.log("info", String(message)),
  warn: (message) => host.log("warn", String(message)),
  error: (message) => host.log("error", String(message)),
};

/** Subject streams: every event with a subject belongs to that subject's stream. */
export const stream = {
  MAX_PAGE: 1000,
  /** Up to `limit` events after version `after`, oldest first, and the version. */
  read(subject, after = 0, limit = 1000) {
    const page = host.readStream(subject, BigInt(after), limit);
    return { events: page.events.map((e) => new Event(e)), version: Number(page.version) };
  },
  /** The stream's current version (0 for a subject with no event). */
  version(subject) {
    return Number(host.readStream(subject, 0n, 0).version);
  },
  /** Most events `readAll` gathers; a longer stream is a `Retry` (see `readAtMost`). */
  MAX_READ_ALL: 100000,
  /**
   * The whole stream, page by page, if it holds at most `maxEvents` events; a longer one
   * throws `Retry` as soon as a page shows it, before the call runs out of memory (keep a
   * long-lived aggregate's state in KV, or read it a page at a time).
   */
  readAtMost(subject, maxEvents) {
    const events = [];
    let after = 0;
    for (;;) {
      const page = stream.read(subject, after, 1000);
      events.push(...page.events);
      if (events.length > maxEvents) {
        throw new Retry(`the stream of \`${subject}\` holds more than ${maxEvents} events`);
      }
      if (page.events.length === 0 || events.length >= page.version) {
        return { events, version: page.version };
      }
      after = page.events[page.events.length - 1].streamVersion ?? after + page.events.length;
    }
  },
  /** The whole stream, up to `MAX_READ_ALL` events (see `readAtMost`). */
  readAll(subject) {
    return stream.readAtMost(subject, stream.MAX_READ_ALL);
  },
};

function outcome(error) {
  // `instanceof` runs a thrown proxy's traps, which may throw in turn: that is a bug to
  // report, not an exception to escape the report.
  try {
    if (error instanceof Retry) return { tag: "retry", val: error.message || "retry" };
    if (error instanceof Reject) return { tag: "reject", val: error.message || "reject" };
  } catch {
    // Reported as a bug below.
  }
  return undefined;
}

// A bug's description goes to stderr, which the host reads when the call traps. The host
// takes the line starting `Uncaught ` as the summary, so the report must reach stderr
// whatever was thrown: `String` itself throws for an object without a prototype, and
// would show any other object as `[object Object]`.
function reportBug(error) {
  let text;
  try {
    text =
      error instanceof Error
        ? `Uncaught ${error.name}: ${error.message}\n${error.stack ?? ""}`
        : `Uncaught ${show(error)}`;
  } catch {
    text = `Uncaught ${UNSHOWABLE}`;
  }
  console.error(text.trimEnd());
}

const UNSHOWABLE = "a value that cannot be shown";

function show(value) {
  if (typeof value === "string") return value;
  try {
    const json = JSON.stringify(value);
    if (json !== undefined) return json;
  } catch {
    // A cycle or a BigInt: `String` may still show it.
  }
  try {
    return String(value);
  } catch {
    return UNSHOWABLE;
  }
}

class Bug extends Error {}

function run(handle, event, delivery) {
  try {
    const result = handle(new Event(event, delivery));
    // The call ends before any promise settles: an async handler's outcome, and a
    // `Retry` or `Reject` it throws, would be lost and the event acknowledged.
    if (result !== null && typeof result === "object" && typeof result.then === "function") {
      throw new TypeError(
        "handle returned a Promise: handlers are synchronous (no `async`, no `await`), " +
          "and the outcome of a promise would be lost",
      );
    }
    return undefined;
  } catch (error) {
    const failure = outcome(error);
    if (failure) return failure;
    reportBug(error);
    throw new Bug("uncaught exception in the handler");
  }
}

/**
 * Declares the plugin: `{ handle(event), subscriptions, name?, version? }`. Returns the
 * `handler` and `batchHandler` exports.
 */
export function handler({ handle, subscriptions, name = "js-plugin", version = "0.1.0" }) {
  if (typeof handle !== "function") throw new TypeError("handler needs a handle(event) function");
  if (!Array.isArray(subscriptions)) {
    throw new TypeError("subscriptions is a list of patterns, such as ['order.*']");
  }
  return {
    handler: {
      describe() {
        return { name, version, subscriptions };
      },
      handle(event, delivery) {
        const failure = run(handle, event, delivery);
        if (failure) throw { payload: failure };
      },
    },
    batchHandler: {
      handleBatch(items) {
        items.forEach((item, index) => {
          host.beginItem(index);
          const failure = run(handle, item.event, item.delivery);
          host.endItem(failure ? { tag: "err", val: failure } : { tag: "ok" });
        });
      },
    },
  };
}
