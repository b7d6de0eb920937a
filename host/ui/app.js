// The Switchyard status page: a small single-page app over the host's JSON API.
//
// - Every call goes through `api()`, which sends the admin token (kept in this tab's
//   sessionStorage, never in a URL or a cookie) as a bearer header; a 401 shows the token
//   form instead of the page.
// - Views are chosen by the URL's hash (#/, #/plugins/NAME, #/dlq, #/events,
//   #/scheduled) and render with DOM calls and textContent only: event data and error
//   messages come from producers and plugins and are never parsed as HTML.
// - Live: the current view refreshes 2 s after its last refresh ended, while the tab is
//   visible, so a slow host never has two refreshes of one tab at once; each refresh
//   asks for one page of data (lists are paginated), so an open page costs the host a few
//   small requests every 2 s whatever the number of plugins or dead letters.
// - A view's frame (headings, filters, empty cards) is made before its first data comes,
//   so a first load that fails leaves the filters to correct and the next refresh fills
//   it; an answer that comes after the reader moved to another view is dropped.
// - Times are UTC, in the text and on the plots' axes alike.
"use strict";

const REFRESH_MS = 2000;
const PAGE = 50;
const TOKEN_KEY = "switchyard.token";
const main = document.getElementById("main");
let timer = null;
let generation = 0;
const plots = new Map();
const shown = new Map();

// Whether `data` differs from what `key` showed last: an unchanged table is left alone,
// so a refresh does not close what the reader opened.
function changed(key, data) {
  const text = JSON.stringify(data);
  if (shown.get(key) === text) return false;
  shown.set(key, text);
  return true;
}

class Unauthorized extends Error {}

// JSON as the host wrote it: a number JavaScript cannot hold exactly (an id past 2^53, a
// `1e400`) keeps its text, so event data shows as stored (where the browser can say what
// the text was).
function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    const lossy = typeof value === "number" && (!Number.isFinite(value) || (Number.isInteger(value) && !Number.isSafeInteger(value)));
    return lossy && context && typeof JSON.rawJSON === "function" ? JSON.rawJSON(context.source) : value;
  });
}
/** An answer for a view the reader has left. */
class Stale extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ accept: "application/json" }, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) throw new Unauthorized();
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? parseJson(await response.text()) : await response.text();
  if (!response.ok) {
    const message = body && body.error ? body.error.message : String(body);
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const num = (n) => (n === undefined || n === null ? "–" : Number(n).toLocaleString("en"));
const short = (hash) => (hash ? hash.slice(0, 12) : "–");
const link = (href, text) => el("a", { href }, text);
const qs = (params) => {
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") search.set(k, v);
  const text = search.toString();
  return text ? "?" + text : "";
};

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = Object.fromEntries(new URLSearchParams(query || ""));
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "plugins" && parts[1]) return { view: "plugin", name: decodeURIComponent(parts[1]), params };
  if (parts[0] === "dlq") return { view: "dlq", params };
  if (parts[0] === "events") return { view: "events", params };
  if (parts[0] === "scheduled") return { view: "scheduled", params };
  return { view: "overview", params };
}

function setHash(path, params) {
  location.hash = "#" + path + qs(params);
}

// ---------------------------------------------------------------------------------------
// Plots

function plot(id, title, series, data, height = 180) {
  const host = document.getElementById(id);
  if (!host) return;
  const style = getComputedStyle(host);
  const inner = host.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const width = Math.max(240, Math.floor(inner));
  if (!data[0] || data[0].length < 2) {
    host.replaceChildren(el("h3", {}, title), el("div", { class: "empty" }, "collecting data…"));
    plots.delete(id);
    return;
  }
  const key = series.map((s) => s.label).join("|");
  const existing = plots.get(id);
  if (existing && existing.key === key && existing.width === width) {
    existing.chart.setData(data);
    return;
  }
  const colors = ["#2563eb", "#15803d", "#b91c1c", "#b45309", "#7c3aed", "#0891b2", "#be185d", "#4b5563"];
  const target = el("div");
  host.replaceChildren(el("h3", {}, title), target);
  const chart = new uPlot(
    {
      width,
      height,
      legend: { live: false },
      series: [{}].concat(series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length], width: 1.5 }))),
      axes: [{ label: "UTC" }, { size: 50 }],
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    },
    data,
    target,
  );
  plots.set(id, { chart, key, width });
}

const seconds = (ms) => ms.map((t) => t / 1000);

// ---------------------------------------------------------------------------------------
// Overview

async function overview(params, first, get) {
  const after = params.after || "";
  if (first) {
    main.replaceChildren(
      el("h1", {}, "Overview"),
      el("div", { class: "plots" },
        el("div", { class: "card plot", id: "plot-ingest" }),
        el("div", { class: "card plot", id: "plot-deliveries" }),
        el("div", { class: "card plot", id: "plot-lag" })),
      el("h2", {}, "Plugins"),
      el("div", { id: "plugins" }),
      el("div", { id: "flash" }),
      el("div", { id: "absent" }),
    );
  }
  const [stats, list] = await Promise.all([
    get("/v1/stats?window=15m&top=8"),
    get("/v1/plugins" + qs({ after, limit: PAGE })),
  ]);
  const t = seconds(stats.t);
  plot("plot-ingest", "Ingested events/s (15 min)", [{ label: "events/s" }], [t, stats.ingested_per_s]);
  const outcomes = Object.keys(stats.deliveries_per_s);
  plot("plot-deliveries", "Deliveries/s by outcome",
    outcomes.length ? outcomes.map((o) => ({ label: o })) : [{ label: "ok" }],
    [t].concat(outcomes.length ? outcomes.map((o) => stats.deliveries_per_s[o]) : [t.map(() => 0)]));
  const lagged = Object.keys(stats.lag);
  plot("plot-lag", "Lag per plugin (most behind)",
    lagged.length ? lagged.map((p) => ({ label: p })) : [{ label: "lag" }],
    [seconds(stats.lag_t)].concat(lagged.length ? lagged.map((p) => stats.lag[p]) : [stats.lag_t.map(() => 0)]));

  if (changed("absent", [list.absent, list.absent_total])) absentPlugins(list);
  // Left alone while nothing changed, so focus and a selection in the table stay.
  if (!changed("plugins", list)) return;
  const rows = list.plugins.map((p) =>
    el("tr", { "data-plugin": p.name },
      el("td", {}, link("#/plugins/" + encodeURIComponent(p.name), p.name)),
      el("td", { class: "state-" + stateOf(p), "data-col": "state", title: p.delivery && p.delivery.reason || "" }, stateOf(p)),
      el("td", {}, p.version || "–", el("div", { class: "mono muted" }, short(p.sha256))),
      el("td", { class: "wide" }, (p.subscriptions || []).map((s) => el("span", { class: "pill" }, s))),
      el("td", { class: "num", "data-col": "lag" }, num(p.lag)),
      el("td", { class: "num", "data-col": "in_flight" }, num(p.in_flight)),
      el("td", { class: "num", "data-col": "handled" }, num(p.handled)),
      el("td", { class: "num", "data-col": "failed" }, num(p.failed)),
      el("td", { class: "num wide" }, num(p.pending_retries)),
      el("td", { class: "num", "data-col": "dead_letters" },
        p.dead_letters ? link("#/dlq" + qs({ plugin: p.name }), num(p.dead_letters)) : "0"),
      el("td", { class: "wide error" },
        p.load_error ? "load error: " + p.load_error : p.error || (p.last_error ? `${p.last_error.kind}: ${p.last_error.message}` : "")),
    ));
  const pager = el("div", { class: "pager" },
    el("span", { class: "muted" }, `${num(list.total)} plugin${list.total === 1 ? "" : "s"}`),
    after ? el("button", { onclick: () => setHash("/", {}) }, "First page") : null,
    list.next_after ? el("button", { onclick: () => setHash("/", { after: list.next_after }) }, "Next page") : null);
  document.getElementById("plugins").replaceChildren(
    el("div", { class: "scroll" },
      el("table", { id: "plugins-table" },
        el("thead", {}, el("tr", {},
          ["Plugin", "State", "Version", "Subscriptions", "Lag", "In flight", "Handled", "Failed", "Retries", "Dead letters", "Last error"]
            .map((h, i) => el("th", { class: [3, 8, 10].includes(i) ? "wide" : "" }, h)))),
        el("tbody", {}, rows))),
    pager);
}

/** The plugins whose state the bus keeps with no file here to serve them, each with the
 * button that forgets it (`DELETE /v1/plugins/NAME`, refused while a host serves it). */
function absentPlugins(list) {
  const box = document.getElementById("absent");
  if (!list.absent_total) return box.replaceChildren();
  const rows = list.absent.map((p) => el("tr", { "data-absent": p.name },
    el("td", {}, p.name),
    el("td", { class: "num wide" }, num(p.cursor)),
    el("td", { class: "num" }, num(p.lag)),
    el("td", { class: "num wide" }, num(p.pending_retries)),
    el("td", { class: "num" }, p.dead_letters ? link("#/dlq" + qs({ plugin: p.name }), num(p.dead_letters)) : "0"),
    el("td", {}, el("button", { class: "forget", type: "button", onclick: () => confirmThen(
      `Forget ${p.name}? Its place in the log, pending retries, dead letters and KV are deleted for good, ` +
      "on every host. A plugin added later under this name starts afresh.", async () => {
        await api(`/v1/plugins/${encodeURIComponent(p.name)}`, { method: "DELETE" });
        flash(`Plugin ${p.name} forgotten.`);
      }) }, "Forget"))));
  box.replaceChildren(
    el("h2", {}, "Plugins with no file here"),
    el("p", { class: "muted", id: "absent-summary" },
      `The log keeps the place, retries, dead letters and KV of ${num(list.absent_total)} plugin` +
      `${list.absent_total === 1 ? "" : "s"} that no file on this host serves: removed, renamed, or served by other hosts ` +
      "only. Each cursor holds its events back from retention. Forget a plugin removed for good" +
      (list.absent.length < list.absent_total ? `; the first ${list.absent.length} by name are shown.` : "."),
    ),
    el("div", { class: "scroll" }, el("table", { id: "absent-table" },
      el("thead", {}, el("tr", {}, ["Plugin", "Cursor", "Lag", "Retries", "Dead letters", ""]
        .map((h, i) => el("th", { class: [1, 3].includes(i) ? "wide" : "" }, h)))),
      el("tbody", {}, rows))));
}

/** `failed` for a plugin that did not load, else its delivery state (running, paused,
 * breaker-open, probing). */
function stateOf(p) {
  return p.status === "failed" ? "failed" : (p.delivery ? p.delivery.state : p.status);
}

/** The state with since when and why, and the button that pauses or resumes. */
function deliveryFacts(p) {
  const d = p.delivery || { state: p.status, breaker: { state: "closed" } };
  const b = d.breaker || { state: "closed" };
  const state = el("span", { id: "delivery-state" },
    el("span", { class: "state-" + stateOf(p) }, stateOf(p)),
    d.since ? el("span", { class: "muted" }, ` since ${d.since}`) : null,
    d.reason ? el("div", { class: d.state === "paused" ? "" : "error" }, d.reason) : null);
  const action = d.state === "running" || d.state === "probing"
    ? el("button", { id: "pause", type: "button", onclick: () => confirmThen(
        `Pause ${p.name} on every host? Its events wait in the log until it is resumed.`, async () => {
          await api(`/v1/plugins/${encodeURIComponent(p.name)}/pause`, {
            method: "POST", headers: { "content-type": "application/json" },
            body: JSON.stringify({ reason: "paused from the status page" }) });
        }) }, "Pause")
    : el("button", { id: "resume", class: "primary", type: "button", onclick: () => confirmThen(
        `Resume ${p.name}? Its waiting events are delivered${b.state === "closed" ? "" : " and its breaker closes"}.`, async () => {
          await api(`/v1/plugins/${encodeURIComponent(p.name)}/resume`, { method: "POST" });
        }) }, "Resume");
  const breaker = b.state === "closed" ? "closed"
    : `${b.state} since ${b.since}, ${b.state === "open" ? "next probe" : "probe lease ends"} ${b.until}, cooldown ${b.cooldown}`;
  return [["State", p.status === "failed" ? state : el("span", {}, state, " ", action)], ["Breaker", breaker]];
}

// ---------------------------------------------------------------------------------------
// One plugin

async function pluginPage(name, params, first, get) {
  if (first) {
    main.replaceChildren(
      el("h1", {}, "Plugin ", el("span", { class: "mono" }, name)),
      el("div", { id: "plugin-info" }),
      el("div", { class: "plots" },
        el("div", { class: "card plot", id: "plot-throughput" }),
        el("div", { class: "card plot", id: "plot-duration" }),
        el("div", { class: "card plot", id: "plot-plugin-lag" })),
      el("h2", {}, "Recent errors"), el("div", { id: "recent-errors" }),
      el("h2", {}, "KV"), kvBrowser(name),
      el("h2", {}, "Loads of its files"), el("div", { id: "history" }),
    );
  }
  const [p, stats] = await Promise.all([
    get("/v1/plugins/" + encodeURIComponent(name)),
    get("/v1/stats" + qs({ window: "15m", plugin: name, top: 0 })),
  ]);
  const policy = p.policy || {};
  const retry = policy.retry || {};
  const limits = p.limits || {};
  const facts = [
    ...deliveryFacts(p),
    ["Version", p.version || "–"], ["SHA-256", el("span", { class: "mono" }, p.sha256 || "–")],
    ["File", el("span", { class: "mono" }, p.file)], ["Loaded", p.loaded_at],
    ["Load error", p.load_error ? el("span", { class: "error", id: "load-error" }, p.load_error) : "none"],
    ["Subscriptions", (p.subscriptions || []).map((s) => el("span", { class: "pill" }, s))],
    ["Cursor / lag", `${num(p.cursor)} / ${num(p.lag)}`], ["In flight", num(p.in_flight)],
    ["Handled / failed (this host)", `${num(p.handled)} / ${num(p.failed)}`],
    ["Pending retries", num(p.pending_retries)],
    ["Dead letters", p.dead_letters ? link("#/dlq" + qs({ plugin: name }), num(p.dead_letters)) : "0"],
    ["Limits", `fuel ${num(limits.fuel)}, memory ${num(limits.memory_bytes)} bytes, timeout ${num(limits.timeout_ms)} ms`],
    ["Policy", `concurrency ${num(policy.concurrency)}, ordering ${policy.ordering}, start ${policy.start}, instance ${policy.instance}`],
    ["Retry", `${num(retry.max_attempts)} attempts, ${retry.backoff} from ${num(retry.initial_ms)} ms to ${num(retry.max_ms)} ms` +
      `${retry.jitter ? ", jitter" : ""}${retry.max_age_ms ? `, max age ${num(retry.max_age_ms)} ms` : ""}`],
  ];
  if (p.error) facts.splice(1, 0, ["Error", el("span", { class: "error" }, p.error)]);
  const s = stats.plugin || { t: [], handled_per_s: [], failed_per_s: [], mean_duration_ms: [], lag: [] };
  const t = seconds(s.t);
  plot("plot-throughput", "Handled and failed per second", [{ label: "handled/s" }, { label: "failed/s" }], [t, s.handled_per_s, s.failed_per_s]);
  plot("plot-duration", "Mean handler duration (ms)", [{ label: "ms" }], [t, s.mean_duration_ms]);
  plot("plot-plugin-lag", "Lag", [{ label: "events" }], [t, s.lag]);
  // Left alone while nothing changed, so focus and a selection (its SHA-256) stay.
  if (!changed("plugin", p)) return;
  document.getElementById("plugin-info").replaceChildren(
    el("dl", { class: "kv card" }, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));

  const errors = (p.recent_errors || []).slice().reverse();
  document.getElementById("recent-errors").replaceChildren(errors.length
    ? el("div", { class: "scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, ["When", "Event", "Attempt", "Kind", "Message"].map((h) => el("th", {}, h)))),
        el("tbody", {}, errors.map((e) => el("tr", {},
          el("td", {}, e.at), el("td", { class: "mono" }, e.event_id), el("td", { class: "num" }, e.attempt),
          el("td", {}, e.kind), el("td", { class: "error" }, e.message))))))
    : el("p", { class: "muted" }, "No failed attempts since this host started."));
  const history = (p.history || []).slice().reverse();
  document.getElementById("history").replaceChildren(el("div", { class: "scroll" }, el("table", { id: "history-table" },
    el("thead", {}, el("tr", {}, ["When", "Version", "SHA-256", "Result"].map((h) => el("th", {}, h)))),
    el("tbody", {}, history.map((h) => el("tr", {},
      el("td", {}, h.at), el("td", {}, h.version || "–"), el("td", { class: "mono" }, short(h.sha256)),
      el("td", { class: h.error ? "error" : "" }, h.error ? "failed: " + h.error : "serving")))))));
}

function kvBrowser(name) {
  const box = el("div", { class: "card", id: "kv" });
  const prefix = el("input", { placeholder: "key prefix", id: "kv-prefix" });
  const list = el("div");
  const value = el("pre", { hidden: true, id: "kv-value" });
  async function load(after) {
    const page = await api(`/v1/plugins/${encodeURIComponent(name)}/kv` + qs({ prefix: prefix.value, after, limit: PAGE }));
    list.replaceChildren(...[
      page.keys.length ? el("ul", { class: "mono", id: "kv-keys" }, page.keys.map((key) =>
        el("li", {}, el("a", { href: "#", "data-key": key, onclick: async (e) => {
          e.preventDefault();
          // In the query, not the path: a browser resolves `..` and `.` segments of a path.
          const text = await api(`/v1/plugins/${encodeURIComponent(name)}/kv` + qs({ key }));
          value.hidden = false;
          value.textContent = `${key} = ${typeof text === "string" ? text : JSON.stringify(text)}`;
        } }, key)))) : el("p", { class: "muted" }, "No keys with this prefix."),
      page.next_after ? el("button", { onclick: () => load(page.next_after) }, "Next keys") : null,
    ].filter(Boolean));
  }
  box.append(el("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); load().catch(show); } },
    el("label", {}, "Prefix", prefix), el("button", { type: "submit" }, "List keys")), list, value);
  load().catch(show);
  return box;
}

// ---------------------------------------------------------------------------------------
// Dead letters

const REASONS = ["", "rejected", "exhausted", "expired", "effects", "loop", "schema"];

// "Replay all" and "Delete all" for the plugin (and kind) the page is filtered on.
function bulkActions(params) {
  const which = { plugin: params.plugin, reason: params.reason };
  const what = params.reason ? `${params.plugin}'s ${params.reason} dead letters` : `${params.plugin}'s dead letters`;
  return [
    el("button", { id: "replay-all", class: "primary", type: "button", onclick: () => confirmThen(
      `Replay all of ${what}?`, async () => {
        const done = await api("/v1/dlq/replay" + qs(which), { method: "POST" });
        flash(`Replayed ${done.replayed} of ${what}.`);
      }) }, "Replay all"),
    el("button", { id: "delete-all", class: "delete", type: "button", onclick: () => confirmThen(
      `Delete all of ${what} for good?`, async () => {
        const done = await api("/v1/dlq" + qs(which), { method: "DELETE" });
        flash(`Deleted ${done.deleted} of ${what}.`);
      }) }, "Delete all"),
  ];
}

async function deadLetters(params, first, get) {
  if (first) {
    const plugin = el("input", { id: "dlq-plugin", value: params.plugin || "", placeholder: "any" });
    const reason = el("select", { id: "dlq-reason" }, REASONS.map((r) => el("option", { value: r, selected: r === (params.reason || "") }, r || "any")));
    main.replaceChildren(
      el("h1", {}, "Dead letters"),
      el("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); setHash("/dlq", { plugin: plugin.value, reason: reason.value }); } },
        el("label", {}, "Plugin", plugin), el("label", {}, "Kind", reason), el("button", { type: "submit" }, "Filter"),
        ...(params.plugin ? bulkActions(params) : [])),
      el("div", { id: "flash" }),
      el("div", { id: "dlq" }),
    );
  }
  const page = await get("/v1/dlq" + qs({ plugin: params.plugin, reason: params.reason, after: params.after, limit: PAGE }));
  if (!changed("dlq", page)) return;
  const rows = page.dead_letters.map((d) => el("tr", { "data-id": d.id },
    el("td", { class: "num" }, d.id),
    el("td", {}, link("#/plugins/" + encodeURIComponent(d.plugin), d.plugin)),
    el("td", {}, d.reason),
    el("td", {}, el("div", {}, d.event.type), el("div", { class: "mono muted" }, d.event.id)),
    el("td", { class: "wide" }, d.dead_at),
    el("td", {}, el("details", {}, el("summary", {}, `${d.attempts} attempt(s)`),
      el("ol", {}, d.errors.map((e) => el("li", { class: "error" }, `${e.kind}: ${e.message} (${e.at})`))),
      el("pre", {}, JSON.stringify(d.event, null, 2)))),
    el("td", {},
      el("button", { class: "replay", onclick: () => confirmThen(`Replay dead letter ${d.id} to ${d.plugin}?`, async () => {
        await api(`/v1/dlq/${d.id}/replay`, { method: "POST" });
        flash(`Dead letter ${d.id} replayed to ${d.plugin}.`);
      }) }, "Replay"), " ",
      el("button", { class: "delete", onclick: () => confirmThen(`Delete dead letter ${d.id} for good?`, async () => {
        await api(`/v1/dlq/${d.id}`, { method: "DELETE" });
        flash(`Dead letter ${d.id} deleted.`);
      }) }, "Delete"))));
  document.getElementById("dlq").replaceChildren(
    rows.length ? el("div", { class: "scroll" }, el("table", { id: "dlq-table" },
      el("thead", {}, el("tr", {}, ["Id", "Plugin", "Kind", "Event", "Dead since", "Errors", ""].map((h, i) => el("th", { class: i === 4 ? "wide" : "" }, h)))),
      el("tbody", {}, rows))) : el("p", { class: "muted", id: "dlq-empty" }, "No dead letters here."),
    el("div", { class: "pager" },
      params.after ? el("button", { onclick: () => setHash("/dlq", { plugin: params.plugin, reason: params.reason }) }, "First page") : null,
      page.next_after ? el("button", { onclick: () => setHash("/dlq", { plugin: params.plugin, reason: params.reason, after: page.next_after }) }, "Next page") : null));
}

// ---------------------------------------------------------------------------------------
// Events

async function events(params, first, get) {
  if (first) {
    const type = el("input", { id: "events-type", value: params.type || "", placeholder: "order.* or >" });
    const subject = el("input", { id: "events-subject", value: params.subject || "" });
    main.replaceChildren(
      el("h1", {}, params.caused ? "Events caused by " : "Events", params.caused ? el("span", { class: "mono" }, params.caused) : ""),
      el("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); setHash("/events", { type: type.value, subject: subject.value }); } },
        el("label", {}, "Type pattern", type), el("label", {}, "Subject", subject), el("button", { type: "submit" }, "Browse")),
      el("div", { id: "events" }),
    );
  }
  const page = await get("/v1/events" + qs({ type: params.type, subject: params.subject, causationid: params.caused, after: params.after, limit: PAGE }));
  if (!changed("events", page)) return;
  const rows = page.events.map((s) => {
    const e = s.event;
    return el("tr", { "data-id": e.id },
      el("td", { class: "num" }, s.sequence),
      el("td", { class: "wide" }, s.ingested_at),
      el("td", {}, e.type),
      el("td", { class: "mono" }, e.id),
      el("td", { class: "wide" }, e.subject || ""),
      el("td", {}, e.causationid ? el("span", { class: "mono" }, e.causationid) : ""),
      el("td", {}, link("#/events" + qs({ caused: e.id, after: s.sequence }), "what it caused →"),
        el("details", {}, el("summary", {}, "event"), el("pre", {}, JSON.stringify(e, null, 2)))));
  });
  document.getElementById("events").replaceChildren(
    rows.length ? el("div", { class: "scroll" }, el("table", { id: "events-table" },
      el("thead", {}, el("tr", {}, ["Seq", "Ingested", "Type", "Id", "Subject", "Caused by", ""].map((h, i) => el("th", { class: [1, 4].includes(i) ? "wide" : "" }, h)))),
      el("tbody", {}, rows))) : el("p", { class: "muted" }, "No matching events in this stretch of the log."),
    el("div", { class: "pager" },
      page.next_after ? el("button", { onclick: () => setHash("/events", Object.assign({}, params, { after: page.next_after })) }, "Later events") : el("span", { class: "muted" }, "End of the log.")));
}

// ---------------------------------------------------------------------------------------
// Scheduled events

async function scheduled(params, first, get) {
  if (first) {
    const type = el("input", { id: "scheduled-type", value: params.type || "", placeholder: "any" });
    main.replaceChildren(
      el("h1", {}, "Scheduled events"),
      el("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); setHash("/scheduled", { type: type.value }); } },
        el("label", {}, "Type", type), el("button", { type: "submit" }, "Filter")),
      el("div", { id: "flash" }),
      el("div", { id: "scheduled" }),
    );
  }
  const list = await get("/v1/scheduled" + qs({ type: params.type, limit: PAGE }));
  if (!changed("scheduled", list)) return;
  // The API lists the soonest first and has no further pages: say when there are more.
  const summary = `${num(list.pending)} pending in all, soonest first` +
    (list.scheduled.length === PAGE ? `; the first ${PAGE}${params.type ? " of this type" : ""} shown` : "");
  const rows = list.scheduled.map((s) => el("tr", { "data-id": s.id },
    el("td", {}, s.due),
    el("td", {}, el("div", {}, s.type), el("div", { class: "mono muted" }, s.id)),
    el("td", { class: "wide" }, s.source),
    el("td", { class: "wide" }, s.scheduled_at),
    el("td", { class: "wide" }, el("details", {}, el("summary", {}, "event"), el("pre", {}, JSON.stringify(s.event, null, 2)))),
    el("td", {},
      el("button", { class: "cancel", onclick: () => confirmThen(
        `Cancel scheduled event ${s.id}? It will never be appended.`, async () => {
          await api(`/v1/scheduled/${encodeURIComponent(s.id)}`, { method: "DELETE" });
          flash(`Scheduled event ${s.id} cancelled.`);
        }) }, "Cancel event"))));
  document.getElementById("scheduled").replaceChildren(
    el("p", { class: "muted", id: "scheduled-summary" }, summary),
    rows.length ? el("div", { class: "scroll" }, el("table", { id: "scheduled-table" },
      el("thead", {}, el("tr", {}, ["Due", "Event", "Source", "Scheduled at", "", ""].map((h, i) => el("th", { class: [2, 3, 4].includes(i) ? "wide" : "" }, h)))),
      el("tbody", {}, rows))) : el("p", { class: "muted", id: "scheduled-empty" }, "No scheduled events here."));
}

// ---------------------------------------------------------------------------------------
// Token, confirmation, messages, refresh

function loginForm() {
  stop();
  const input = el("input", { type: "password", id: "token", autocomplete: "off", placeholder: "admin token" });
  main.replaceChildren(el("div", { class: "login card" },
    el("h1", {}, "Admin token needed"),
    el("p", { class: "muted" }, "This host requires an admin token. It is kept in this tab only and sent as a bearer header."),
    sessionStorage.getItem(TOKEN_KEY) ? el("p", { class: "error", id: "token-refused" }, "The host refused that token.") : null,
    el("form", { onsubmit: (e) => { e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, input.value.trim()); render(); } },
      input, el("button", { type: "submit", class: "primary" }, "Open"))));
  input.focus();
}

function confirmThen(text, action) {
  const modal = document.getElementById("modal");
  document.getElementById("modal-text").textContent = text;
  modal.hidden = false;
  const ok = document.getElementById("modal-ok");
  const cancel = document.getElementById("modal-cancel");
  const close = () => { modal.hidden = true; ok.onclick = null; cancel.onclick = null; };
  cancel.onclick = close;
  ok.onclick = async () => {
    close();
    try { await action(); await refresh(); } catch (error) { show(error); }
  };
}

function flash(text, bad) {
  const box = document.getElementById("flash");
  if (box) box.replaceChildren(el("div", { class: bad ? "notice bad" : "notice", id: "flash-text" }, text));
}

function show(error) {
  if (error instanceof Unauthorized) return loginForm();
  const box = document.getElementById("flash") || main;
  box.prepend(el("div", { class: "notice bad" }, String(error.message || error)));
}

/** Says why the page cannot refresh, in one banner that the next refresh replaces (a
 * page left open through an outage does not pile up a notice every 2 s), or takes it
 * away once a refresh succeeds. */
function trouble(error) {
  const banner = document.getElementById("trouble");
  const live = document.getElementById("live");
  if (error) {
    banner.textContent = String(error.message || error) + " — retrying every 2 s";
    banner.hidden = false;
    live.textContent = "not updating";
  } else {
    banner.hidden = true;
    live.textContent = "live";
  }
  live.classList.toggle("failing", Boolean(error));
}

async function refresh(first = false) {
  const current = generation;
  const get = (path) => api(path).then((body) => {
    if (current !== generation) throw new Stale();
    return body;
  });
  const focused = document.activeElement && document.activeElement.id;
  const where = route();
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active",
    a.dataset.nav === where.view || (a.dataset.nav === "overview" && where.view === "plugin")));
  document.getElementById("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
  try {
    if (where.view === "plugin") await pluginPage(where.name, where.params, first, get);
    else if (where.view === "dlq") await deadLetters(where.params, first, get);
    else if (where.view === "events") await events(where.params, first, get);
    else if (where.view === "scheduled") await scheduled(where.params, first, get);
    else await overview(where.params, first, get);
    main.dataset.loaded = String(Date.now());
    trouble(null);
  } catch (error) {
    if (error instanceof Stale) return;
    if (error instanceof Unauthorized) return loginForm();
    if (current === generation) trouble(error);
  }
  // A part made again takes the focus back, so a keyboard user is not thrown out of it.
  const again = focused && document.activeElement.id !== focused && document.getElementById(focused);
  if (again) again.focus();
}

/** Refreshes the view `REFRESH_MS` after the last refresh ended, until it changes. */
function schedule(current) {
  timer = setTimeout(async () => {
    if (!document.hidden) await refresh(false);
    if (current === generation && timer !== null) schedule(current);
  }, REFRESH_MS);
}

function stop() {
  if (timer) clearTimeout(timer);
  timer = null;
}

function render() {
  generation += 1;
  stop();
  plots.clear();
  shown.clear();
  main.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  delete main.dataset.loaded;
  const current = generation;
  refresh(true).then(() => {
    if (current === generation && !main.querySelector(".login")) schedule(current);
  });
}

document.addEventListener("visibilitychange", () => {
  document.getElementById("live").classList.toggle("paused", document.hidden);
});
document.getElementById("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); render(); });
window.addEventListener("hashchange", render);
let resizing = null;
window.addEventListener("resize", () => {
  // Plots take the width of their card when made: make them again at the new width.
  clearTimeout(resizing);
  // Not on the token form, whose input a redraw would empty.
  resizing = setTimeout(() => { if (timer) refresh(false); }, 100);
});
render();
