// kt-fleet console: plain script, no build step. Every change goes through the console's
// server (same origin, JSON body), which speaks to the coordinator as the operator.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
};
const fmtTime = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "");
const banner = (text) => { const b = $("banner"); b.textContent = text || ""; b.hidden = !text; };

async function getJson(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function postJson(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

// ---- pages -------------------------------------------------------------------------------
const PAGES = ["fleet", "rollouts", "decisions", "doctor"];
let current = null;
function show() {
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "fleet";
  for (const name of PAGES) {
    $("page-" + name).hidden = name !== page;
    const link = $("nav-" + name);
    if (name === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (current !== page) {
    current = page;
    if (page === "rollouts") refreshRollouts();
    if (page === "decisions") { startTail(); refreshChart(); }
  }
}

// ---- confirmation with a reason ----------------------------------------------------------
function confirmWithReason(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-reason").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" ? $("confirm-reason").value : null);
    }, { once: true });
    dialog.showModal();
    $("confirm-reason").focus();
  });
}

// ---- fleet -------------------------------------------------------------------------------
const fleet = new Map();
function fleetRow(r) {
  const labels = Object.entries(r.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  const version = (v, h) => (v ? `${v} ${h ? "(" + h.replace("sha256:", "").slice(0, 8) + ")" : ""}` : "");
  return el("tr", { "data-gateway": r.gateway },
    el("th", { scope: "row" }, r.gateway),
    el("td", {}, (r.groups || []).join(", ")),
    el("td", { "data-col": "region" }, r.region || ""),
    el("td", {}, labels),
    el("td", { "data-col": "status", class: "state-" + r.status }, r.status),
    el("td", { "data-col": "agent", class: "state-" + r.agent }, r.agent),
    el("td", { "data-col": "running" }, version(r.config_version, r.config_hash)),
    el("td", { "data-col": "desired" }, version(r.desired_version, r.desired_hash)),
    el("td", { "data-col": "sync", class: "state-" + r.sync }, r.sync),
    el("td", {}, r.last_seen ? `${r.last_seen_seconds_ago}s ago` : "never"),
    el("td", {}, r.agent_cert_not_after || ""));
}
function fillSelect(select, values) {
  const chosen = select.value;
  const first = select.options[0];
  select.replaceChildren(first, ...[...values].sort().map((v) => el("option", { value: v }, v)));
  select.value = chosen;
}
function renderFleet() {
  const rows = [...fleet.values()].sort((a, b) => a.gateway.localeCompare(b.gateway));
  fillSelect($("filter-group"), new Set(rows.flatMap((r) => r.groups || [])));
  fillSelect($("filter-region"), new Set(rows.map((r) => r.region).filter(Boolean)));
  fillSelect($("filter-state"), new Set(rows.flatMap((r) => [r.agent, r.status])));
  fillSelect($("history-group"), new Set(rows.flatMap((r) => r.groups || [])));
  const group = $("filter-group").value, region = $("filter-region").value;
  const state = $("filter-state").value, text = $("filter-text").value.toLowerCase();
  const shown = rows.filter((r) =>
    (!group || (r.groups || []).includes(group)) &&
    (!region || r.region === region) &&
    (!state || r.agent === state || r.status === state) &&
    (!text || JSON.stringify(r).toLowerCase().includes(text)));
  $("fleet-table").tBodies[0].replaceChildren(...shown.map(fleetRow));
  const counts = {};
  for (const r of rows) { counts[r.agent] = (counts[r.agent] || 0) + 1; counts[r.status] = (counts[r.status] || 0) + 1; }
  $("fleet-counts").replaceChildren(
    el("li", {}, `${rows.length} gateways`),
    ...Object.entries(counts).sort().map(([k, n]) => el("li", { class: "state-" + k, "data-count": k }, `${n} ${k}`)));
}
function watchFleet() {
  const source = new EventSource("/api/fleet/stream");
  source.addEventListener("snapshot", (e) => {
    fleet.clear();
    for (const r of JSON.parse(e.data).rows) fleet.set(r.gateway, r);
    $("fleet-live").textContent = "live";
    renderFleet();
  });
  source.addEventListener("row", (e) => {
    const r = JSON.parse(e.data);
    fleet.set(r.gateway, r);
    renderFleet();
  });
  source.onerror = () => { $("fleet-live").textContent = "reconnecting"; };
}

// ---- rollouts ----------------------------------------------------------------------------
const WAITING = ["paused", "awaiting_promotion"];
const ACTIVE = ["planned", "running", "rolling_back"];
function actionsFor(r) {
  const can = {
    pause: ["running", "planned"].includes(r.state),
    resume: r.state === "paused",
    promote: r.state === "awaiting_promotion",
    abort: [...ACTIVE, ...WAITING].includes(r.state),
  };
  return el("div", { class: "actions" }, ...Object.entries(can).filter(([, ok]) => ok).map(([action]) =>
    el("button", {
      type: "button", "data-action": action, "data-rollout": r.id,
      onclick: async () => {
        const reason = await confirmWithReason(`${action} rollout ${r.id}?`);
        if (reason === null) return;
        try { await postJson(`/api/rollouts/${encodeURIComponent(r.id)}/${action}`, { reason }); banner(""); }
        catch (error) { banner(`${action} ${r.id}: ${error.message}`); }
        refreshRollouts();
      },
    }, action[0].toUpperCase() + action.slice(1))));
}
function rolloutCard(r) {
  const batches = (r.batches || []).map((gateways, i) => el("div", { class: "batch", "data-batch": i },
    el("strong", {}, `batch ${i + 1}${i === r.current_batch && ACTIVE.concat(WAITING).includes(r.state) ? " (current)" : ""}: `),
    ...gateways.map((g) => el("span", { class: "state-" + g.state, "data-gateway": g.gateway, title: g.error || "" }, `${g.gateway} ${g.state} `))));
  const gates = (r.gates || []);
  return el("article", { class: "rollout", "data-rollout": r.id, "data-state": r.state },
    el("header", {},
      el("strong", {}, r.id),
      el("span", { class: "state-" + r.state, "data-col": "state" }, r.state.replace(/_/g, " ")),
      el("span", {}, `${r.config ? r.config.version : ""} to ${r.target}`),
      el("span", { class: "muted" }, `by ${r.created_by} ${fmtTime(r.created_at_unix_ms)}`)),
    r.step ? el("p", {}, r.step) : null,
    r.message ? el("p", { class: "muted" }, r.message) : null,
    el("div", { class: "batches" }, batches),
    gates.length ? el("table", { class: "gates" },
      el("caption", {}, "Gate evaluations"),
      el("thead", {}, el("tr", {}, ...["Batch", "Gate", "Measured", "Threshold", "Decision", "Why"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...gates.map((g) => el("tr", {},
        el("td", {}, g.batch + 1), el("td", {}, g.gate), el("td", {}, g.value), el("td", {}, g.threshold),
        el("td", { class: "state-" + (g.decision === "pass" ? "pass" : g.decision === "fail" ? "fail" : "warn") }, g.decision),
        el("td", {}, g.detail))))) : null,
    actionsFor(r));
}
let rolloutTimer = null;
let rolloutsShown = "";
async function refreshRollouts() {
  clearTimeout(rolloutTimer);
  try {
    const { rollouts } = await getJson("/api/rollouts");
    // Re-rendered only when something changed, so a button is not replaced under the pointer.
    const shown = JSON.stringify([rollouts, $("history-group").value]);
    if (shown === rolloutsShown) {
      if (current === "rollouts") rolloutTimer = setTimeout(refreshRollouts, 1000);
      return;
    }
    rolloutsShown = shown;
    const waiting = rollouts.filter((r) => WAITING.includes(r.state));
    const active = rollouts.filter((r) => ACTIVE.includes(r.state));
    const place = (id, list) => $(id).replaceChildren(...(list.length ? list.map(rolloutCard) : [el("p", { class: "muted" }, "none")]));
    place("rollouts-waiting", waiting);
    place("rollouts-active", active);
    const group = $("history-group").value;
    $("undo-button").disabled = !group;
    const done = rollouts.filter((r) => !WAITING.includes(r.state) && !ACTIVE.includes(r.state) && (!group || (r.target === "group " + group)));
    $("rollouts-history").replaceChildren(historyTable(done.slice(0, 30)));
  } catch (error) { banner("rollouts: " + error.message); }
  if (current === "rollouts") rolloutTimer = setTimeout(refreshRollouts, 1000);
}
function historyTable(list) {
  if (!list.length) return el("p", { class: "muted" }, "none");
  return el("table", {},
    el("thead", {}, el("tr", {}, ...["Rollout", "State", "From", "To", "Target", "When", ""].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...list.map((r) => {
      const from = (r.batches || []).flat().map((g) => g.baseline && g.baseline.hash).find(Boolean);
      const to = r.config && r.config.hash;
      return el("tr", { "data-rollout": r.id },
        el("td", {}, r.id), el("td", { class: "state-" + r.state }, r.state.replace(/_/g, " ")),
        el("td", {}, from ? from.replace("sha256:", "").slice(0, 8) : ""), el("td", {}, r.config ? r.config.version : ""),
        el("td", {}, r.target), el("td", {}, fmtTime(r.created_at_unix_ms)),
        el("td", {}, from && to ? el("button", { type: "button", onclick: () => showDiff(from, to) }, "Diff") : ""));
    })));
}
async function showDiff(from, to) {
  try {
    const { diff } = await getJson(`/api/diff?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`);
    $("diff").textContent = diff;
    $("diff").hidden = false;
  } catch (error) { banner("diff: " + error.message); }
}
async function undoGroup() {
  const group = $("history-group").value;
  const reason = await confirmWithReason(`Undo group ${group}'s last successful rollout (all at once, back to what ran before)?`);
  if (reason === null) return;
  try { await postJson(`/api/groups/${encodeURIComponent(group)}/undo`, { reason }); banner(""); }
  catch (error) { banner(`undo ${group}: ${error.message}`); }
  refreshRollouts();
}

// ---- decisions ---------------------------------------------------------------------------
let tail = null;
// The policy whose verdict became the request's (none for an allow).
function decidedBy(d) {
  const found = (d.policies_evaluated || []).find((p) => p.result === d.verdict && d.verdict !== "allow");
  return found ? found.name : "";
}
function startTail() {
  if (tail) tail.close();
  const params = new URLSearchParams({
    gateway: $("tail-gateway").value, group: $("tail-group").value, verdict: $("tail-verdict").value,
    policy: $("tail-policy").value, reason: $("tail-reason").value, config_version: $("tail-version").value,
  });
  $("tail-table").tBodies[0].replaceChildren();
  tail = new EventSource("/api/events/stream?" + params);
  tail.addEventListener("decision", (e) => {
    const d = JSON.parse(e.data);
    const body = $("tail-table").tBodies[0];
    body.prepend(el("tr", { "data-verdict": d.verdict, "data-gateway": d.gateway_id },
      el("td", {}, d.timestamp || fmtTime(d.stored_at_unix_ms)), el("td", {}, d.gateway_id), el("td", {}, d.region),
      el("td", { class: "state-" + d.verdict }, d.verdict), el("td", {}, decidedBy(d)), el("td", {}, d.reason_code || ""),
      el("td", {}, d.config_version || "")));
    while (body.rows.length > 200) body.deleteRow(-1);
  });
  tail.addEventListener("notice", (e) => banner(JSON.parse(e.data).text));
}
// Styles are set through the CSSOM: the page's policy allows no inline style attributes.
function swatch(color) {
  const span = el("span", { class: "swatch" });
  span.style.backgroundColor = color;
  return span;
}
const COLORS = ["#0550ae", "#a40e26", "#116329", "#7d4e00", "#8250df", "#1b7c83", "#bf3989", "#57606a"];
let chartTimer = null;
async function refreshChart() {
  clearTimeout(chartTimer);
  try {
    const data = await getJson("/api/decisions");
    drawChart(data, $("chart-by").value);
  } catch (error) { banner("decisions: " + error.message); }
  if (current === "decisions") chartTimer = setTimeout(refreshChart, 2000);
}
function drawChart(data, by) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); return n; };
  const W = 900, H = 260, pad = 30;
  const end = Date.now(), start = end - 30 * 60 * 1000;
  const x = (t) => pad + ((t - start) / (end - start)) * (W - 2 * pad);
  const y = (rate) => H - pad - rate * (H - 2 * pad);
  const parts = [node("line", { x1: pad, y1: y(0), x2: W - pad, y2: y(0), stroke: "#d0d7de" }),
    node("line", { x1: pad, y1: y(1), x2: W - pad, y2: y(1), stroke: "#eef1f4" })];
  const label = node("text", { x: 2, y: y(1) + 4, "font-size": 10, fill: "#57606a" }); label.textContent = "100%"; parts.push(label);
  const keys = [...new Set(data.buckets.flatMap((b) => Object.keys(b[by])))].sort();
  const legend = [];
  keys.forEach((key, i) => {
    const color = COLORS[i % COLORS.length];
    const points = data.buckets.filter((b) => b[by][key] && b[by][key].total > 0)
      .map((b) => `${x(b.at + data.bucket_ms / 2).toFixed(1)},${y(b[by][key].blocked / b[by][key].total).toFixed(1)}`);
    if (points.length) {
      parts.push(node("polyline", { points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2, "data-series": key }));
      for (const p of points) { const [px, py] = p.split(","); parts.push(node("circle", { cx: px, cy: py, r: 2.5, fill: color })); }
    }
    const blocked = data.buckets.reduce((n, b) => n + (b[by][key] ? b[by][key].blocked : 0), 0);
    const total = data.buckets.reduce((n, b) => n + (b[by][key] ? b[by][key].total : 0), 0);
    legend.push(el("li", { "data-series": key, "data-blocked": blocked, "data-total": total },
      swatch(color), `${key}: ${blocked}/${total} blocked`));
  });
  for (const r of data.rollouts) {
    for (const [t, dash] of [[r.start, "6 3"], [r.end, "2 3"]]) {
      if (!t || t < start) continue;
      parts.push(node("line", { x1: x(t), y1: pad / 2, x2: x(t), y2: H - pad, stroke: "#8250df", "stroke-dasharray": dash, "data-rollout": r.id }));
    }
  }
  svg.replaceChildren(...parts);
  $("chart-legend").replaceChildren(...(legend.length ? legend : [el("li", { class: "muted" }, "no decisions in the last 30 minutes")]));
}

// ---- doctor ------------------------------------------------------------------------------
async function runDoctor() {
  $("doctor-run").disabled = true;
  $("doctor-summary").textContent = "checking…";
  try {
    const report = await getJson("/api/doctor");
    $("doctor-summary").textContent = `${report.summary.errors} failed, ${report.summary.warnings} warnings (${report.coordinator})`;
    $("doctor-table").tBodies[0].replaceChildren(...report.checks.map((c) => el("tr", { "data-mark": c.mark },
      el("td", {}, c.section), el("td", {}, c.subject), el("td", { class: "state-" + c.mark }, c.mark),
      el("td", {}, c.value), el("td", {}, c.threshold), el("td", {}, c.hint || ""))));
    $("doctor-table").hidden = false;
  } catch (error) { $("doctor-summary").textContent = "doctor: " + error.message; }
  $("doctor-run").disabled = false;
}

// ---- start -------------------------------------------------------------------------------
window.addEventListener("hashchange", show);
document.addEventListener("DOMContentLoaded", async () => {
  for (const id of ["filter-group", "filter-region", "filter-state", "filter-text"]) $(id).addEventListener("input", renderFleet);
  $("fleet-filters").addEventListener("submit", (e) => e.preventDefault());
  $("history-group").addEventListener("change", refreshRollouts);
  $("undo-button").addEventListener("click", undoGroup);
  $("tail-filters").addEventListener("submit", (e) => { e.preventDefault(); startTail(); });
  $("chart-by").addEventListener("change", refreshChart);
  $("doctor-run").addEventListener("click", runDoctor);
  try {
    const me = await getJson("/api/whoami");
    $("operator").textContent = "as " + me.operator;
  } catch (error) { banner(error.message); return; }
  watchFleet();
  show();
});
