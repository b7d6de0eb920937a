// Types of `switchyard.js`, the JavaScript SDK for Switchyard event-handler plugins.

/** A transient failure: the host retries the event later, with backoff. */
export class Retry extends Error {
  constructor(message?: string);
}

/** A permanent failure: the host sends the event to the dead letters at once. */
export class Reject extends Error {
  constructor(message?: string);
}

/** Where this call stands in the delivery of its event. */
export interface Delivery {
  attempt: number;
  maxAttempts: number;
  sequence: number;
  /** Whether a `Retry` now sends the event to the dead letters. */
  isLastAttempt: boolean;
}

/** A CloudEvent as the host delivers it, with the call's delivery. */
export class Event {
  /** Made by the SDK from what the host hands over; handlers receive them. */
  constructor(event: unknown, delivery?: unknown);
  id: string;
  source: string;
  type: string;
  subject: string | undefined;
  time: string | undefined;
  datacontenttype: string | undefined;
  dataschema: string | undefined;
  data: Uint8Array;
  extensions: Record<string, string>;
  /** The call's delivery; `undefined` for an event read from a stream. */
  delivery: Delivery | undefined;
  /** The data decoded as JSON; data that does not decode throws `Reject`. */
  json(): any;
  /** The data decoded as UTF-8; data that does not decode throws `Reject`. */
  text(): string;
  /** The value of the CloudEvents extension attribute `name`, if present. */
  extension(name: string): string | undefined;
  get correlationId(): string | undefined;
  get causationId(): string | undefined;
  get partitionKey(): string | undefined;
  /** The event's position in its subject's stream. */
  get streamVersion(): number | undefined;
}

/** Options of `emit`; `delay` and `deliverAt` exclude each other. */
export interface EmitOptions {
  subject?: string;
  /** The data's media type, instead of the one `emit` infers from the data. */
  contentType?: string;
  extensions?: Record<string, string>;
  partitionKey?: string;
  /** Append only if the subject's stream is at this version (`0`: no stream yet). */
  expectedVersion?: number | bigint;
  /** Milliseconds from the commit until the event is published. */
  delay?: number;
  /** When to publish the event: an RFC 3339 time or a `Date`. */
  deliverAt?: string | Date;
}

/**
 * Emits an event, committed with the call; returns its id.
 *
 * `data` may be a `Uint8Array` (`application/octet-stream`), a string (`text/plain`) or
 * anything JSON can encode (`application/json`); data JSON cannot encode throws `Reject`.
 */
export function emit(type: string, data?: unknown, options?: EmitOptions): string;

/** Cancels a scheduled event by the id `emit` returned; `false` if it is gone. */
export function cancelScheduled(id: string): boolean;

/** The plugin's own key-value store. */
export const kv: {
  /** The bytes stored at `key`, or `undefined`. */
  get(key: string): Uint8Array | undefined;
  /** The UTF-8 text stored at `key`, or `undefined`. */
  getText(key: string): string | undefined;
  /** The JSON value stored at `key`, or `undefined`; a value that is not JSON throws `Reject`. */
  getJson(key: string): any;
  /** Stores a `Uint8Array`, or a string as UTF-8. */
  set(key: string, value: Uint8Array | string): void;
  /** Stores `value` encoded as JSON; a value JSON cannot encode throws `Reject`. */
  setJson(key: string, value: unknown): void;
  delete(key: string): void;
  /** The keys starting with `prefix`, sorted. */
  keys(prefix?: string): string[];
};

/** The `[config]` table of the plugin's sidecar, read-only. */
export const config: {
  get(key: string): string | undefined;
  get<T>(key: string, fallback: T): string | T;
  /** The value parsed by `parse`; a value it refuses (or turns into `NaN`) throws `Reject`. */
  getParsed<T>(key: string, parse: (value: string) => T): T | undefined;
  getParsed<T, F>(key: string, parse: (value: string) => T, fallback: F): T | F;
};

/** Log lines with a level, in the host's log with the plugin's name. */
export const log: {
  trace(message: unknown): void;
  debug(message: unknown): void;
  info(message: unknown): void;
  warn(message: unknown): void;
  error(message: unknown): void;
};

/** Events of a stream, oldest first, and the stream's current version. */
export interface StreamPage {
  events: Event[];
  version: number;
}

/** Subject streams: every event with a subject belongs to that subject's stream. */
export const stream: {
  /** Most events one read returns. */
  MAX_PAGE: number;
  /** Up to `limit` events after version `after`, oldest first, and the version. */
  read(subject: string, after?: number, limit?: number): StreamPage;
  /** The stream's current version (0 for a subject with no event). */
  version(subject: string): number;
  /** Most events `readAll` gathers. */
  MAX_READ_ALL: number;
  /** The whole stream if it holds at most `maxEvents` events; throws `Retry` past that. */
  readAtMost(subject: string, maxEvents: number): StreamPage;
  /** The whole stream, up to `MAX_READ_ALL` events (throws `Retry` past that). */
  readAll(subject: string): StreamPage;
};

/** What `handler` takes: the handler function and the plugin's description. */
export interface PluginDefinition {
  /** Handles one event; returning acknowledges it. Synchronous: a returned promise is a bug. */
  handle(event: Event): void;
  /** Default event-type patterns, such as `order.*`; an operator's sidecar may replace them. */
  subscriptions: string[];
  name?: string;
  version?: string;
}

/** The component's `handler` export; export it from the plugin's module as it is. */
export interface HandlerExport {
  describe(): { name: string; version: string; subscriptions: string[] };
  handle(event: unknown, delivery: unknown): void;
}

/** The component's `batch-handler` export; export it from the plugin's module as it is. */
export interface BatchHandlerExport {
  handleBatch(items: unknown[]): void;
}

/** Declares the plugin. Returns the `handler` and `batchHandler` exports. */
export function handler(definition: PluginDefinition): {
  handler: HandlerExport;
  batchHandler: BatchHandlerExport;
};
