// The portcullis console: reads the admin API and draws it. Plain JavaScript, served as
// written (no build step). Text from the API is only ever set as text (textContent), never
// parsed as HTML. Every state change is confirmed in a dialog, sent with the page's CSRF
// token, and decided by the server (the buttons shown are the ones the viewer's policy
// permits; a forced call gets 403 all the same).
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
let last = null;
let selectedExecution = null;
const definitions = new Map();

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = dv;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function fmt(n) {
  if (n === null || n === undefined) return "–";
  if (typeof n === "number") return Number.isInteger(n) ? n.toLocaleString("en") : n.toFixed(1);
  return String(n);
}

function ago(t) {
  if (!t) return "never";
  const s = Math.round((Date.now() - Date.parse(t)) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function duration(s) {
  if (!s) return "0s";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? h + "h" : "") + (m ? m + "m" : "") + (r || (!h && !m) ? r + "s" : "");
}

function notice(text, bad) {
  const n = $("notice");
  n.textContent = text;
  n.className = bad ? "notice bad" : "notice";
  n.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { n.hidden = true; }, 6000);
}

// ---- API calls ------------------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, headers: { "x-csrf-token": CSRF }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    location.href = "/login?ended=1";
    throw new Error("signed out");
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) {
    const why = (data && (data.error || data.message)) || text.trim() || r.statusText;
    const e = new Error(r.status + ": " + why);
    e.status = r.status;
    throw e;
  }
  return data;
}

// A dialog that asks before anything changes. Resolves to the typed value (or true), or
// null when cancelled.
function confirmAction(text, input) {
  const d = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-extra").hidden = !input;
  if (input) {
    $("confirm-label").firstChild.textContent = input.label + " ";
    $("confirm-input").value = input.value;
  }
  return new Promise((resolve) => {
    d.addEventListener("close", () => {
      if (d.returnValue !== "ok") return resolve(null);
      resolve(input ? $("confirm-input").value : true);
    }, { once: true });
    d.returnValue = "";
    d.showModal();
  });
}

async function act(text, method, path, body, input) {
  const v = await confirmAction(text, input);
  if (v === null) return;
  try {
    await api(method, path, typeof body === "function" ? body(v) : body);
    notice("Done: " + text.replace(/\?$/, "."));
  } catch (e) {
    notice("Refused: " + e.message, true);
    return;
  }
  // Show the change now, not at the stream's next look (up to a second later).
  try { draw(await api("GET", "/api/v1/dashboard")); } catch (_) { /* the stream redraws */ }
}

// ---- Panels -----------------------------------------------------------------------------

function fill(tableId, rows) {
  $(tableId).tBodies[0].replaceChildren(...rows);
}

function drawTraffic(d) {
  fill("listeners-table", (d.listeners || []).map((l) =>
    el("tr", {}, el("td", {}, l.name), el("td", {}, l.bind), el("td", {}, l.tls ? "yes" : "no"), el("td", { class: "num" }, fmt(l.connections)))));
  fill("routes-table", (d.routes || []).map((r) =>
    el("tr", { data: { route: r.id } },
      el("td", {}, r.id), el("td", {}, r.backend), el("td", { class: "num" }, fmt(r.rps)),
      el("td", { class: "num" }, fmt(r.codes["2xx"])), el("td", { class: "num" }, fmt(r.codes["3xx"])),
      el("td", { class: "num" + (r.codes["4xx"] ? " warn" : "") }, fmt(r.codes["4xx"])),
      el("td", { class: "num" + (r.codes["5xx"] ? " bad" : "") }, fmt(r.codes["5xx"])),
      el("td", { class: "num" }, fmt(r.decisions.allow)),
      el("td", { class: "num" + (r.decisions.deny ? " warn" : "") }, fmt(r.decisions.deny)),
      el("td", { class: "num" }, fmt(r.decisions.would_deny)),
      el("td", { class: "num" }, fmt(r.p50_ms)), el("td", { class: "num" }, fmt(r.p99_ms)),
      el("td", { class: "num" }, fmt(r.total)))));
}

function serverPath(b, s) {
  return "/api/v1/backends/" + encodeURIComponent(b.id) + "/servers/" + encodeURIComponent(s.name);
}

function serverActions(b, s) {
  const cell = el("td", { class: "actions" });
  const name = b.id + "/" + s.name;
  if (s.can.state) {
    for (const [state, label] of [["ready", "Ready"], ["drain", "Drain"], ["maint", "Maint"]]) {
      if (s.admin === state) continue;
      cell.append(el("button", {
        type: "button", class: "act", data: { action: state, server: name },
        onclick: () => act(label + " " + name + "?", "POST", serverPath(b, s) + "/state", { state }),
      }, label));
    }
  }
  if (s.can.weight) {
    cell.append(el("button", {
      type: "button", class: "act", data: { action: "weight", server: name },
      onclick: () => act("Set the weight of " + name, "PUT", serverPath(b, s) + "/weight",
        (v) => ({ weight: Number(v) }), { label: "Weight", value: s.weight }),
    }, "Weight…"));
  }
  return cell;
}

function drawBackends(d) {
  const list = $("backends-list");
  const blocks = (d.backends || []).map((b) => {
    const rows = b.servers.map((s) => el("tr", { data: { server: b.id + "/" + s.name, state: s.state } },
      el("td", {}, s.name),
      el("td", {}, s.address),
      el("td", {}, el("span", { class: "state " + s.state.toLowerCase() }, s.state)),
      el("td", {}, !s.health_checked ? "no check" : s.check
        ? (s.check.ok ? "passed " : "failed " + (s.check.detail ? "(" + s.check.detail + ") " : "")) + ago(s.check.at)
        : "pending"),
      el("td", { class: "num" }, fmt(s.weight) + (s.weight !== s.config_weight ? " (" + s.config_weight + ")" : "")),
      el("td", { class: "num" }, fmt(s.active) + " / " + (s.max_connections ? fmt(s.max_connections) : "∞")),
      el("td", { class: "num" }, fmt(s.queued)),
      el("td", { class: "num" }, fmt(s.rps)),
      el("td", { class: "num" }, fmt(s.total)),
      el("td", { class: "num" + (s.errors ? " warn" : "") }, fmt(s.errors)),
      el("td", { class: "num" }, fmt(s.ejections)),
      el("td", { class: "num" }, duration(s.downtime_s)),
      serverActions(b, s)));
    return el("div", { class: "backend", data: { backend: b.id } },
      el("h3", {}, b.id, el("span", { class: "meta" }, " in flight " + fmt(b.in_flight) + " · retries " + fmt(b.retries))),
      el("table", { class: "grid servers" },
        el("thead", {}, el("tr", {}, ...["server", "address", "state", "last check", "weight", "conns / max", "queue", "req/s", "requests", "errors", "ejections", "downtime", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
  });
  list.replaceChildren(...blocks);
}

function drawIdentity(d) {
  fill("identity-table", (d.identity || []).map((p) => {
    const k = p.keys;
    return el("tr", {},
      el("td", {}, p.name), el("td", {}, p.kind), el("td", {}, p.issuer || "–"),
      el("td", {}, k ? ago(k.last_fetch) : "–"),
      el("td", {}, k ? (k.kids.join(", ") || "–") + (k.without_kid ? " +" + k.without_kid + " without kid" : "") : "–"),
      el("td", { class: k && k.last_error ? "bad" : "" }, k && k.last_error ? k.last_error.error + " (" + ago(k.last_error.at) + ")" : "–"));
  }));
}

// In a fleet: whose entries these are (the fleet's from Redis, or this process's when Redis
// did not answer).
function fleetNote(t) {
  if (t.source === "redis") return " · the fleet's, from Redis (" + fmt(t.scanned) + " keys read" + (t.truncated ? ", more not read" : "") + ")";
  if (t.source === "local") return " · this process's only: " + t.error;
  return "";
}

function drawTables(d) {
  const blocks = (d.tables || []).map((t) => {
    const names = t.entries.length ? Object.keys(t.entries[0].counters) : [];
    const rows = t.entries.map((e) => el("tr", {},
      el("td", {}, e.key),
      ...names.map((n) => el("td", { class: "num" }, fmt(e.counters[n]))),
      el("td", {}, (e.tags || []).join(", ")),
      el("td", { class: "actions" }, t.can.clear ? el("button", {
        type: "button", class: "act", data: { action: "clear", key: e.key },
        onclick: () => act("Clear " + e.key + " from " + t.table.name + "?", "DELETE",
          "/api/v1/tables/" + encodeURIComponent(t.table.name) + "/entries/" + encodeURIComponent(e.key)),
      }, "Clear") : "")));
    return el("div", { class: "table", data: { table: t.table.name } },
      el("h3", {}, t.table.name, el("span", { class: "meta" }, " " + fmt(t.table.entries) + " keys of " + fmt(t.table.size) + " · top by " + t.by + fleetNote(t))),
      el("table", { class: "grid" },
        el("thead", {}, el("tr", {}, el("th", {}, "key"), ...names.map((n) => el("th", {}, n)), el("th", {}, "tags"), el("th", {}))),
        el("tbody", {}, ...rows)));
  });
  $("tables-list").replaceChildren(...blocks);
}

async function drawUsage() {
  if (!last || !last.can.usage) return;
  try {
    const u = await api("GET", "/api/v1/usage");
    const rows = [];
    for (const [plan, keys] of Object.entries(u.plans || {})) {
      for (const [key, days] of Object.entries(keys)) {
        const q = ((u.quota || {})[plan] || {})[key];
        const today = days.length ? days[days.length - 1][1] : 0;
        rows.push(el("tr", {}, el("td", {}, plan), el("td", {}, key), el("td", { class: "num" }, fmt(today)),
          el("td", { class: "num" }, q ? fmt(q.used) + " / " + fmt(q.limit) : "–"), el("td", {}, q ? q.per : "–")));
      }
    }
    fill("usage-table", rows);
  } catch (e) { /* shown next time */ }
}

function drawExecutions(d) {
  fill("executions-table", (d.executions || []).map((x) => {
    const actions = el("td", { class: "actions" });
    if (x.status === "RUNNING" && x.awaitingCallback && x.can.callback) {
      actions.append(
        el("button", { type: "button", class: "act", data: { action: "approve", execution: x.executionId },
          onclick: () => act("Approve the step " + (x.currentStates || []).join(", ") + " of " + x.executionId + "?", "POST", "/api/v1/executions/" + encodeURIComponent(x.executionId) + "/approve", {}) }, "Approve"),
        el("button", { type: "button", class: "act", data: { action: "reject", execution: x.executionId },
          onclick: () => act("Reject the step " + (x.currentStates || []).join(", ") + " of " + x.executionId + "?", "POST", "/api/v1/executions/" + encodeURIComponent(x.executionId) + "/reject", {}) }, "Reject"));
    }
    if (x.status === "RUNNING" && x.can.stop) {
      actions.append(el("button", { type: "button", class: "act", data: { action: "stop", execution: x.executionId },
        onclick: () => act("Stop " + x.executionId + "?", "POST", "/api/v1/executions/" + encodeURIComponent(x.executionId) + "/stop", {}) }, "Stop"));
    }
    return el("tr", { data: { execution: x.executionId }, class: selectedExecution === x.executionId ? "selected" : "" },
      el("td", {}, el("a", { href: "#workflows", onclick: () => selectExecution(x) }, x.name || x.executionId)),
      el("td", {}, x.workflow), el("td", {}, el("span", { class: "status " + x.status.toLowerCase() }, x.status)),
      el("td", {}, (x.currentStates || []).join(", ") || "–"), el("td", {}, ago(x.startedAt)), el("td", {}, x.startedBy || "–"), actions);
  }));
  if (selectedExecution) {
    const x = (d.executions || []).find((e) => e.executionId === selectedExecution);
    if (x) refreshExecution(x);
  }
}

async function selectExecution(x) {
  selectedExecution = x.executionId;
  await refreshExecution(x);
}

// Never draw a task's callback token.
function redact(v) {
  if (Array.isArray(v)) return v.map(redact);
  if (v && typeof v === "object") {
    const o = {};
    for (const [k, x] of Object.entries(v)) o[k] = /token/i.test(k) ? "(hidden)" : redact(x);
    return o;
  }
  return v;
}

async function refreshExecution(x) {
  if (!definitions.size) {
    try {
      const w = await api("GET", "/api/v1/workflows");
      for (const def of w.workflows) definitions.set(def.name, def.definition);
    } catch (e) { /* drawn without its graph */ }
  }
  let events = [];
  try { events = (await api("GET", "/api/v1/executions/" + encodeURIComponent(x.executionId) + "/history")).events; } catch (e) { /* empty */ }
  $("execution-detail").hidden = false;
  $("execution-title").textContent = (x.name || x.executionId) + " · " + x.workflow + " · " + x.status;
  const visited = new Set(events.filter((e) => e.type.endsWith("StateEntered")).map((e) => e.details && e.details.name));
  drawGraph(definitions.get(x.workflow), new Set(x.currentStates || []), visited);
  $("execution-history").replaceChildren(...events.slice(-200).map((e) =>
    el("li", {}, el("code", {}, "#" + e.id + " " + e.type), " ", el("span", { class: "meta" }, e.timestamp),
      e.details ? el("pre", {}, JSON.stringify(redact(e.details), null, 1).slice(0, 600)) : "")));
}

// The state machine as a graph: states in layers from StartAt, edges to their next states.
function drawGraph(def, current, visited) {
  const box = $("execution-graph");
  if (!def || !def.States) { box.replaceChildren(el("p", { class: "meta" }, "no definition")); return; }
  const nexts = (s) => {
    const out = [];
    if (s.Next) out.push(s.Next);
    if (s.Default) out.push(s.Default);
    for (const c of s.Choices || []) if (c.Next) out.push(c.Next);
    for (const c of s.Catch || []) if (c.Next) out.push(c.Next);
    return out;
  };
  const layer = new Map([[def.StartAt, 0]]);
  const queue = [def.StartAt];
  while (queue.length) {
    const n = queue.shift();
    for (const m of nexts(def.States[n] || {})) {
      if (!layer.has(m) && def.States[m]) { layer.set(m, layer.get(n) + 1); queue.push(m); }
    }
  }
  for (const n of Object.keys(def.States)) if (!layer.has(n)) layer.set(n, layer.size);
  const rows = new Map();
  for (const [n, l] of layer) { if (!rows.has(l)) rows.set(l, []); rows.get(l).push(n); }
  const W = 170, H = 34, GX = 24, GY = 36;
  const width = Math.max(...[...rows.values()].map((r) => r.length)) * (W + GX) + GX;
  const height = rows.size * (H + GY) + GY;
  const pos = new Map();
  for (const [l, names] of rows) names.forEach((n, i) => pos.set(n, [GX + i * (W + GX), GY / 2 + l * (H + GY)]));
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const mk = (tag, attrs) => { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  for (const [n, [x, y]] of pos) {
    for (const m of nexts(def.States[n] || {})) {
      const t = pos.get(m);
      if (t) svg.append(mk("line", { x1: x + W / 2, y1: y + H, x2: t[0] + W / 2, y2: t[1], class: "edge" }));
    }
  }
  for (const [n, [x, y]] of pos) {
    const cls = "node" + (current.has(n) ? " current" : visited.has(n) ? " visited" : "");
    const g = mk("g", { class: cls, "data-state": n });
    g.append(mk("rect", { x, y, width: W, height: H, rx: 6 }));
    const t = mk("text", { x: x + W / 2, y: y + H / 2 + 4, "text-anchor": "middle" });
    t.textContent = n.length > 22 ? n.slice(0, 21) + "…" : n;
    const title = mk("title", {});
    title.textContent = n + " (" + ((def.States[n] || {}).Type || "?") + ")";
    g.append(title, t);
    svg.append(g);
  }
  box.replaceChildren(svg);
}

async function drawAudit() {
  if (!last || !last.can.audit) return;
  const q = new URLSearchParams({ decision: $("audit-decision").value, q: $("audit-q").value, limit: "50" });
  try {
    const a = await api("GET", "/api/v1/audit?" + q);
    fill("audit-table", a.records.map((r) => {
      const p = r.principal || {};
      return el("tr", { id: "audit-" + r.seq },
        el("td", {}, el("a", { href: "/api/v1/audit?q=" + encodeURIComponent('"seq":' + r.seq + ",") + "&decision=&limit=1" }, "#" + r.seq)),
        el("td", {}, r.time || r.ts || "–"), el("td", {}, r.decision || r.kind || "–"),
        el("td", {}, p.user || p.subject || "–"), el("td", {}, r.route || "–"),
        el("td", {}, [r.method, r.host, r.path].filter(Boolean).join(" ") || "–"),
        el("td", {}, (r.reasons || []).join(", ")));
    }));
  } catch (e) { /* shown next time */ }
}

// ---- Events ----------------------------------------------------------------------------

let eventsPaused = false;
function startEvents() {
  if (startEvents.started || !last || !last.can.events) return;
  startEvents.started = true;
  const src = new EventSource("/api/v1/events/stream");
  src.addEventListener("cloudevent", (m) => {
    if (eventsPaused) return;
    let e;
    try { e = JSON.parse(m.data); } catch (_) { return; }
    const li = el("li", { data: { type: e.type } }, el("code", {}, e.type), " ", e.subject || "", " ",
      el("span", { class: "meta" }, e.time || ""));
    const list = $("events-list");
    list.prepend(li);
    while (list.children.length > 200) list.lastChild.remove();
    applyEventFilter();
  });
}

function applyEventFilter() {
  const f = $("events-filter").value.trim();
  for (const li of $("events-list").children) li.hidden = f !== "" && !li.dataset.type.startsWith(f);
}

// ---- Live updates --------------------------------------------------------------------

function draw(d) {
  last = d;
  $("live").textContent = "live · " + new Date().toLocaleTimeString();
  $("live").className = "meta ok";
  if (d.version) $("version").textContent = d.version;
  for (const [id, has] of [["traffic", d.routes], ["backends", d.backends], ["identity", d.identity], ["limits", d.tables], ["workflows", d.executions], ["events", d.can.events], ["audit", d.can.audit]]) {
    $(id).hidden = !has;
  }
  drawTraffic(d);
  drawBackends(d);
  drawIdentity(d);
  drawTables(d);
  drawExecutions(d);
  startEvents();
}

function connect() {
  const src = new EventSource("/api/v1/dashboard/stream");
  src.addEventListener("dashboard", (m) => draw(JSON.parse(m.data)));
  src.onerror = async () => {
    $("live").textContent = "reconnecting…";
    $("live").className = "meta bad";
    // An ended session is a 401 the stream cannot see: ask once.
    try { await api("GET", "/api/v1/dashboard"); } catch (e) { /* api() redirects on 401 */ }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("logout").addEventListener("click", async () => {
    const r = await fetch("/logout", { method: "POST", headers: { "x-csrf-token": CSRF }, credentials: "same-origin" });
    location.href = r.url || "/login";
  });
  $("events-filter").addEventListener("input", applyEventFilter);
  $("events-pause").addEventListener("click", () => {
    eventsPaused = !eventsPaused;
    $("events-pause").textContent = eventsPaused ? "Resume" : "Pause";
  });
  $("audit-form").addEventListener("submit", (e) => { e.preventDefault(); drawAudit(); });
  connect();
  setInterval(drawUsage, 10000);
  setInterval(drawAudit, 5000);
  setTimeout(() => { drawUsage(); drawAudit(); }, 300);
});
