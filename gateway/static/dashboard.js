// Ponder dashboard: fetches /v1/ponder/* every few seconds and draws every chart as inline SVG.
// No libraries and no external requests (the page's CSP allows 'self' only).
"use strict";

const KEY_STORAGE = "ponder.adminKey";
const REFRESH_MS = 4000;
const SVGNS = "http://www.w3.org/2000/svg";
const STRATEGY_COLORS = {
  single: "#2563eb", cot: "#0891b2", self_consistency: "#d97706", adaptive_consistency: "#ca8a04",
  best_of_n: "#7c3aed", cascade: "#db2777",
};
const EFFORT_COLORS = { none: "#94a3b8", minimal: "#a5b4fc", low: "#60a5fa", medium: "#2563eb", high: "#1e3a8a" };
const TIER_LETTER = { easy: "E", medium: "M", hard: "H" };

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  policy: "", reference: "", spendMode: "hour", selected: null, timer: null, busy: false, again: false, lastOk: 0,
  spend: null, unread: false,
};

// -- small DOM helpers ---------------------------------------------------------------------------

function $(id) { return document.getElementById(id); }

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

// Text from outside the operator's code (an upstream's error message, a model's answer in a vote, names
// from YAML) may hold invisible characters: bidi overrides that show "exe.txt" as "txt.exe" and turn the
// rest of a line around, zero-width ones that make two different ids look the same. Every text the page
// writes shows them as their code point instead. (Markup is never parsed: text goes in as text.)
const INVISIBLE = /[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/g;
function visible(text) {
  return String(text).replace(INVISIBLE, (c) => `[U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}]`);
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = visible(value);
    else if (name === "title" || name === "aria-label") node.setAttribute(name, visible(value));
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    // The CSP forbids style attributes; styles set through the CSSOM are allowed.
    else if (name === "style") node.style.cssText = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(visible(child)));
  }
}

// An empty panel's line. With the store unreachable since the gateway started nothing has been read:
// "nothing yet" would be a guess.
function nothingYet(text) { return state.unread ? "Nothing to show: the telemetry store is unreachable." : text; }

function fill(node, ...children) { node.replaceChildren(); append(node, children); }

function titled(node, text) { node.append(s("title", { text })); return node; }

// -- formatting ----------------------------------------------------------------------------------

function usd(x) {
  if (x === null || x === undefined) return "–";
  if (x === 0) return "$0";
  const a = Math.abs(x), sign = x < 0 ? "-$" : "$";  // -$0.500 as -$1.00 (a loss in "Saved"), not $-0.500
  // to the cent from $1 up ($1234.56 read "$1235"), with thousands separators
  if (a >= 1) return sign + a.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  if (a >= 0.01) return sign + a.toFixed(3);
  return sign + a.toPrecision(3);
}
function usdTick(x) { return x === 0 ? "$0" : "$" + String(Number(x.toPrecision(2))); }
function pct(x, digits = 0) { return x === null || x === undefined ? "–" : (100 * x).toFixed(digits) + "%"; }
function ms(x) { return x === null || x === undefined ? "–" : x >= 10000 ? (x / 1000).toFixed(1) + " s" : Math.round(x) + " ms"; }
function count(x) { return x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en-US"); }
// Times are UTC, as the spend buckets are (the browser's zone would put a request and its hour's bar
// hours apart, and two operators in different zones would read different times for one request).
function time(ts) { return new Date(ts * 1000).toISOString().slice(11, 19); }
function stamp(ts) { return new Date(ts * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC"; }

function parseArm(key) {
  const parts = key.split("/");
  if (parts.length < 4) return { backend: key, effort: null, strategy: "single", n: 1 };
  const n = parseInt(parts.pop(), 10), strategy = parts.pop(), effort = parts.pop();
  return { backend: parts.join("/"), effort: effort === "-" ? null : effort, strategy, n };
}

// SVG text does not wrap: a long name there is cut in the middle (its start and its end, the backend
// and the strategy, are what tell arms apart); the full name is in the element's title.
function clip(text, max) {
  if (text.length <= max) return text;
  const head = Math.ceil((max - 1) * 0.6);
  return text.slice(0, head) + "…" + text.slice(text.length - (max - 1 - head));
}

function shortArm(key) {
  const a = parseArm(key);
  const strat = { single: "", cot: "CoT", self_consistency: "SC", adaptive_consistency: "ASC", best_of_n: "BoN", cascade: "cascade" }[a.strategy] ?? a.strategy;
  return [a.backend, a.effort, strat && (a.n > 1 ? `${strat}×${a.n}` : strat)].filter(Boolean).join(" · ");
}

// One colour per arm, kept for the page's lifetime so an arm looks the same in every chart and refresh.
const ARM_PALETTE = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#92400e", "#475569"];
const armColors = new Map();
function colorOf(key) {
  if (!armColors.has(key)) armColors.set(key, nthColor(armColors.size));
  return armColors.get(key);
}
// Past the palette, hues a golden angle apart (and three lightnesses): the 11th arm no longer takes the
// 1st one's colour, which made two arms one in the legend and on the chart.
function nthColor(i) {
  if (i < ARM_PALETTE.length) return ARM_PALETTE[i];
  const j = i - ARM_PALETTE.length;
  return `hsl(${Math.round((j * 137.508) % 360)}, 70%, ${[38, 50, 30][j % 3]}%)`;
}

// -- API -----------------------------------------------------------------------------------------

class AuthError extends Error {}
// An error answer's `code` (e.g. unknown_policy), to recover from the ones a policy reload causes.
class ApiFailure extends Error { constructor(message, code) { super(message); this.code = code; } }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    throw new AuthError(body.error?.message || `HTTP ${response.status}`);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new ApiFailure(body.error?.message || `HTTP ${response.status}`, body.error?.code);
  }
  return response.json();
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const text = q.toString();
  return text ? "?" + text : "";
}

// -- login ---------------------------------------------------------------------------------------

function showLogin(message) {
  stopTimer();
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = visible(message || "");
  $("status").textContent = "";
  $("key-input").focus();
}

function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !state.key;
}

// -- refresh loop --------------------------------------------------------------------------------

function stopTimer() { if (state.timer) clearTimeout(state.timer); state.timer = null; }

function schedule() {
  stopTimer();
  if ($("live").checked) state.timer = setTimeout(refresh, REFRESH_MS);
}

async function refresh() {
  if (state.busy) { state.again = true; return; }  // the refresh in flight runs once more when it ends
  state.busy = true;
  state.again = false;
  try {
    const asked = { policy: state.policy, reference: state.reference };
    const [summary, spend, savings, requests] = await Promise.all([
      api("/v1/ponder/summary" + query({ policy: asked.policy })),
      api("/v1/ponder/spend"),
      api("/v1/ponder/savings" + query(asked)),
      api("/v1/ponder/requests?limit=50"),
    ]);
    if (state.policy !== asked.policy || state.reference !== asked.reference) {
      // A policy or reference picked while these were on their way: drawing them would put the old
      // choice back in the select (and in state.policy); fetch the new one instead.
      state.busy = false;
      return refresh();
    }
    showApp();
    // Redis away: the gateway answers from what it last read; saying "updated" alone would pass
    // those numbers off as current.
    const hl = summary.health || {};
    const unread = hl.connected === false && !hl.answers_reads;
    state.unread = unread && !hl.last_refresh_ts;  // nothing read since start: "nothing yet" would be a guess
    state.policy = summary.policy;
    renderPolicies(summary);
    renderKpis(summary, spend);
    renderTasks(summary.tasks);
    state.spend = spend;
    renderSpend();
    renderSavings(savings);
    renderLatency(summary.latency);
    renderShares(summary.shares);
    renderRequests(requests.requests, requests.store_readable !== false);
    state.lastOk = Date.now();
    $("status").textContent = "updated " + time(Date.now() / 1000) + " UTC" + (!unread ? ""
      : " · telemetry store unreachable: " + (hl.last_refresh_ts ? `numbers as of ${time(hl.last_refresh_ts)} UTC` : "nothing read from it yet"));
    $("status").classList.toggle("stale", unread);
  } catch (err) {
    if (err instanceof AuthError) {
      showLogin(state.key ? err.message : "");
      state.busy = false;
      return;
    }
    // The policy or reference arm on show is gone (a policy reload renamed or removed it): show the
    // default instead of asking for the missing one every 4 s.
    const gone = err.code === "unknown_policy" && state.policy ? "policy" : err.code === "unknown_arm" && state.reference ? "reference" : null;
    if (gone) {
      if (gone === "policy") state.policy = "";
      state.reference = "";
      state.busy = false;
      return refresh();
    }
    // The panels keep the last numbers drawn: say how old they are, and that the page keeps trying
    // (a gateway restarting answers again within seconds; fetch's own message is "Failed to fetch").
    const why = err instanceof TypeError ? "gateway unreachable" : visible(err.message);
    $("status").textContent = `refresh failed at ${time(Date.now() / 1000)} UTC: ${why}` +
      (state.lastOk ? ` · numbers from ${time(state.lastOk / 1000)} UTC` : "") + " · retrying";
    $("status").classList.add("stale");
  }
  state.busy = false;
  if (state.again) refresh();
  else schedule();
}

// -- header and KPIs -----------------------------------------------------------------------------

function renderPolicies(summary) {
  const select = $("policy");
  const names = summary.policies.length ? summary.policies : [summary.policy];
  if ([...select.options].map((o) => o.value).join() !== names.join()) {
    fill(select, ...names.map((n) => h("option", { value: n, text: n })));
  }
  select.value = summary.policy;
}

function renderKpis(summary, spend) {
  const t = summary.totals;
  // data-value: the exact number behind the rounded text (for tests and for copying).
  $("kpi-requests").textContent = count(t.requests);
  $("kpi-requests").dataset.value = t.requests;
  // spent_usd: what was paid (cost_usd fades with the learner's half-life)
  $("kpi-cost").textContent = usd(t.spent_usd);
  $("kpi-cost").dataset.value = t.spent_usd;
  $("kpi-24h").textContent = usd(spend.cost_usd_24h);
  $("kpi-24h").dataset.value = spend.cost_usd_24h;
  $("kpi-success").textContent = t.success_rate === null ? "no signal yet" : pct(t.success_rate, 1);
  const e = summary.exploration;
  $("kpi-explore").textContent = e.window ? `${pct(e.share, 1)} of ${e.window}` : "–";
  const hl = summary.health || {};
  const ok = hl.connected !== false;
  // budgets checked per replica (Redis away or refusing writes) is worth a red mark even while connected
  const fallback = hl.backend === "redis" && hl.budget_mode === "local";
  $("kpi-store").textContent = `${hl.backend || "?"} · ${ok ? "connected" : "DISCONNECTED"} · ${hl.buffered ?? 0} buffered · ${hl.dropped ?? 0} dropped` +
    (fallback ? " · budgets per replica" : "");
  $("kpi-store").className = "value small " + (ok && !hl.dropped && !fallback ? "" : "bad");
}

// -- scatter: cost (x) vs success rate (y) ---------------------------------------------------------

function scale(lo, hi, a, b, log) {
  if (log) {
    const l0 = Math.log10(lo), l1 = Math.log10(hi);
    return (v) => a + ((Math.log10(Math.max(v, lo)) - l0) / (l1 - l0 || 1)) * (b - a);
  }
  return (v) => a + ((v - lo) / (hi - lo || 1)) * (b - a);
}

function niceTicks(lo, hi, log) {
  if (log) {
    const ticks = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      const v = Math.pow(10, e);
      if (v >= lo * 0.999 && v <= hi * 1.001) ticks.push(v);
    }
    return ticks.length >= 2 ? ticks : [lo, hi];
  }
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / 4 || 1)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((st) => (hi - lo) / st <= 5) || step * 10;
  const ticks = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) ticks.push(v);
  return ticks;
}

// points: [{key, label, x, y (0..1 or null), r, color, pareto, rings: [letters], tip, testid}]
// name: what the chart is of; the points' numbers are added (an image's parts are hidden from screen readers)
function scatter(points, { xLabel, xFormat, testid, name, width = 420, height = 270, labels = "none", yLabel = "success rate" }) {
  const m = { l: 44, r: 16, t: 12, b: 40 };
  const read = points.map((p) => `${p.label}: ${xFormat(p.x)}, ${p.y === null ? "not scored" : pct(p.y, 1)}`).join("; ");
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${name}. ${read}`, "data-testid": testid });
  const costs = points.map((p) => p.x).filter((x) => x > 0);
  let lo = costs.length ? Math.min(...costs) : 0, hi = costs.length ? Math.max(...costs) : 1;
  const log = costs.length > 1 && hi / lo > 20;
  if (log) { lo /= 1.5; hi *= 1.5; } else { lo = 0; hi = hi > 0 ? hi * 1.15 : 1; }
  const yLow = height - m.b - 14; // unscored arms sit on a strip below 0 %
  // Success rates: zoom to the range in use (a 0-100 % axis squeezes 80 % vs 90 % into one blur).
  const rates = points.map((p) => p.y).filter((y) => y !== null);
  const yLo = rates.length ? Math.max(0, Math.floor((Math.min(...rates) - 0.05) * 10) / 10) : 0;
  const yHi = rates.length ? Math.min(1, Math.ceil((Math.max(...rates) + 0.02) * 10) / 10) : 1;
  const yStep = yHi - yLo > 0.5 ? 0.25 : yHi - yLo > 0.2 ? 0.1 : 0.05;
  const X = scale(lo, hi, m.l, width - m.r, log), Y = scale(yLo, yHi, height - m.b - 26, m.t, false);
  const yTicks = [];  // none while no arm is scored: its dots sit on the n/a strip, under no made-up 0-100 % scale
  for (let v = Math.ceil(yLo / yStep - 1e-9) * yStep; rates.length && v <= yHi + 1e-9; v += yStep) yTicks.push(Math.round(v * 100) / 100);
  for (const v of yTicks) {
    svg.append(s("line", { class: "gridline", x1: m.l, x2: width - m.r, y1: Y(v), y2: Y(v) }));
    svg.append(s("text", { x: m.l - 6, y: Y(v) + 3, "text-anchor": "end", text: pct(v) }));
  }
  if (points.some((p) => p.y === null)) svg.append(s("text", { x: m.l - 6, y: yLow + 3, "text-anchor": "end", text: "n/a" }));
  // every point at no cost (a local model's): one $0 tick, not a made-up $0 to $1 scale
  for (const v of costs.length ? niceTicks(lo || 1e-9, hi, log) : [0]) {
    svg.append(s("line", { class: "gridline", x1: X(v), x2: X(v), y1: m.t, y2: height - m.b }));
    svg.append(s("text", { x: X(v), y: height - m.b + 13, "text-anchor": "middle", text: xFormat(v) }));
  }
  svg.append(s("line", { class: "axis", x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b }));
  svg.append(s("text", { x: (m.l + width - m.r) / 2, y: height - 6, "text-anchor": "middle", text: xLabel + (log ? " (log scale)" : "") }));
  svg.append(s("text", { x: 10, y: (m.t + height - m.b) / 2, transform: `rotate(-90 10 ${(m.t + height - m.b) / 2})`, "text-anchor": "middle", text: yLabel }));
  const frontier = points.filter((p) => p.pareto && p.y !== null).sort((a, b) => a.x - b.x);
  if (frontier.length > 1) {
    svg.append(s("polyline", { class: "frontier", "data-testid": "frontier", points: frontier.map((p) => `${X(p.x)},${Y(p.y)}`).join(" ") }));
  }
  for (const p of points) {
    const cx = X(p.x), cy = p.y === null ? yLow : Y(p.y);
    const cls = "point" + (p.pareto ? " pareto" : "") + (p.y === null ? " unscored" : "");
    const g = s("g", { "data-testid": p.testid, "data-arm": p.key, "data-pareto": p.pareto ? "1" : "0" });
    g.append(titled(s("circle", { class: cls, cx, cy, r: p.r, fill: p.color }), p.tip));
    if (p.rings && p.rings.length) {
      g.append(s("circle", { class: "choice-ring", cx, cy, r: p.r + 4, "data-testid": "current-choice" }));
      g.append(s("text", { class: "choice-label", x: cx, y: cy - p.r - 7, "text-anchor": "middle", text: p.rings.join("") }));
    }
    if (labels === "all" || (labels === "frontier" && p.pareto)) {
      const right = cx < width * 0.7;
      g.append(s("text", { class: "point-label", x: cx + (right ? p.r + 6 : -p.r - 6), y: cy + 3, "text-anchor": right ? "start" : "end", text: clip(p.label, 40) }));
    }
    svg.append(g);
  }
  return svg;
}

function renderArmLegend(tasks) {
  const keys = [...new Set(tasks.flatMap((t) => t.arms.map((a) => a.arm)))].sort();
  keys.forEach(colorOf);
  fill($("arm-legend"), keys.map((k) => h("span", { title: k, "data-arm": k }, h("i", { style: `background:${colorOf(k)}` }), shortArm(k))));
}

function renderTasks(tasks) {
  renderArmLegend(tasks);
  const root = $("tasks");
  if (!tasks.length) { fill(root, h("p", { class: "empty", "data-testid": "tasks-empty", text: nothingYet("No requests recorded for this policy yet.") })); return; }
  fill(root, ...tasks.map((task) => {
    const points = task.arms.map((a) => ({
      key: a.arm, label: shortArm(a.arm), x: a.mean_cost_usd, y: a.success_rate,
      r: 4 + 9 * Math.sqrt(a.share), color: colorOf(a.arm), pareto: a.pareto, testid: "arm-point",
      rings: a.current_choice_for.map((t) => TIER_LETTER[t] || t),
      tip: `${a.arm}\n${count(a.requests)} requests (${pct(a.share)} of ${task.task})\nmean cost ${usd(a.mean_cost_usd)}\n` +
        `success ${a.success_rate === null ? "not scored yet" : pct(a.success_rate, 1)} (weight ${a.scored_weight})\n` +
        `p50 ${ms(a.p50_latency_ms)} · p95 ${ms(a.p95_latency_ms)}`,
    }));
    const choices = h("ul", { class: "choices" }, task.tiers.map((t) => h("li", { "data-testid": "tier-choice", "data-tier": t.tier },
      h("span", { class: "tier", text: t.tier }),
      h("span", { text: t.current_choice ? `${shortArm(t.current_choice)} — ${pct(t.current_choice_share)} of ${count(t.requests)} requests` : `${count(t.requests)} requests` }))));
    return h("div", { class: "task-card", "data-testid": "task-chart", "data-task": task.task },
      h("h3", { text: task.task }),
      h("div", { class: "meta", text: `${count(task.requests)} requests · ${usd(task.spent_usd)} · success ${task.success_rate === null ? "not scored" : pct(task.success_rate, 1)}` }),
      scatter(points, { xLabel: "mean cost per request (USD)", xFormat: usdTick, testid: "task-scatter",
        name: `${task.task}: mean cost per request and success rate of each arm` }),
      choices);
  }));
}

// -- spend -----------------------------------------------------------------------------------------

function bars(values, { labels, format, testid, barTestid, name, width = 560, height = 170, every = 1 }) {
  const m = { l: 50, r: 8, t: 10, b: 24 };
  const read = values.map((v, i) => `${labels[i].long} ${format(v)}`).join("; ");
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${name}. ${read}`, "data-testid": testid });
  const max = Math.max(...values, 0) || 1;
  const step = (width - m.l - m.r) / Math.max(values.length, 1);
  const Y = scale(0, max, height - m.b, m.t, false);
  for (const v of [0, max / 2, max]) {
    svg.append(s("line", { class: "gridline", x1: m.l, x2: width - m.r, y1: Y(v), y2: Y(v) }));
    svg.append(s("text", { x: m.l - 6, y: Y(v) + 3, "text-anchor": "end", text: format(v) }));
  }
  values.forEach((v, i) => {
    const x = m.l + i * step;
    svg.append(titled(s("rect", { class: "bar", x: x + 1, width: Math.max(step - 2, 1), y: Y(v), height: Math.max(height - m.b - Y(v), v > 0 ? 1 : 0), "data-testid": barTestid, "data-value": v }), `${labels[i].long}: ${format(v)}`));
    if (i % every === 0) svg.append(s("text", { x: x + step / 2, y: height - 8, "text-anchor": "middle", text: labels[i].short }));
  });
  svg.append(s("line", { class: "axis", x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b }));
  return svg;
}

function renderSpend() {
  const spend = state.spend;
  if (!spend) return;
  const hourly = state.spendMode === "hour";
  const rows = hourly ? spend.by_hour : spend.by_day;
  const labels = rows.map((r) => hourly
    ? { long: r.hour.replace("T", " ").replace(":00Z", ":00 UTC"), short: r.hour.slice(11, 13) + "h" }
    : { long: r.day, short: r.day.slice(5) });
  const period = hourly ? "the last 24 hours" : "the last 30 days";
  // nothing spent: said, not drawn on a $0 to $1 scale of no data
  fill($("spend-chart"), rows.some((r) => r.cost_usd > 0)
    ? bars(rows.map((r) => r.cost_usd), { labels, format: usd, testid: "spend-svg", barTestid: "spend-bar", every: hourly ? 3 : 5,
      name: `Spend per ${hourly ? "hour" : "day"} over ${period}` })
    : h("p", { class: "empty", "data-testid": "spend-empty", text: nothingYet(`Nothing spent in ${period}.`) }));
  const head = h("tr", {}, ["key", "30 days", "requests", "today (UTC) vs daily budget", "this month (UTC) vs monthly budget"].map((t, i) => h("th", { class: i && i < 3 ? "num" : "", text: t })));
  const meter = (spent, cap, used) => {
    // no ledger without a cap: 30-day spend is beside it (a cap of $0 is a cap: the key may spend nothing)
    if (cap === undefined || cap === null) return h("span", { text: "no cap" });
    const over = used >= 1;
    return h("span", {}, h("span", { class: "meter" + (over ? " over" : "") }, h("span", { style: `width:${Math.min(100, 100 * used).toFixed(1)}%` })),
      `${usd(spent || 0)} / ${usd(cap)}`);
  };
  fill($("key-spend"), h("thead", {}, head), h("tbody", {}, spend.keys.map((k) => h("tr", { "data-testid": "key-spend-row", "data-key": k.key_id },
    h("td", { title: k.key_id, text: clip(k.key_id, 40) }), h("td", { class: "num", text: usd(k.cost_usd_30d) }), h("td", { class: "num", text: count(k.requests_30d) }),
    h("td", {}, meter(k.spent.day, k.budget.day, k.used.day)), h("td", {}, meter(k.spent.month, k.budget.month, k.used.month))))));
}

// -- savings ---------------------------------------------------------------------------------------

function renderSavings(sv) {
  const select = $("reference");
  const refs = sv.references || [];
  if ([...select.options].map((o) => o.value).join() !== refs.join()) {
    fill(select, ...refs.map((r) => h("option", { value: r, text: shortArm(r) + "  (" + r + ")" })));
  }
  if (sv.reference) select.value = sv.reference;
  const root = $("savings");
  if (!sv.reference) { fill(root, h("p", { class: "empty", text: nothingYet("No traffic yet.") })); return; }
  const delta = sv.success_rate_delta;
  const unpriced = sv.buckets.filter((b) => b.reference_cost_basis === "unknown").length;
  fill(root, 
    sv.reference_cost_usd === null
      ? h("p", { class: "empty", "data-testid": "savings-unpriced", text: `No price for always ${shortArm(sv.reference)}: it answered none of these requests, and the policy has no estimate for it. Pick another reference.` })
      : h("div", { class: "savings-big" },
      h("div", {}, h("span", { class: "label", text: `Always ${shortArm(sv.reference)}` }), h("span", { class: "value", "data-testid": "reference-cost", text: usd(sv.reference_cost_usd) })),
      h("div", {}, h("span", { class: "label", text: "Actual routed spend" }), h("span", { class: "value", "data-testid": "actual-cost", text: usd(sv.actual_cost_usd) })),
      h("div", {}, h("span", { class: "label", text: "Saved" }), h("span", { class: "value " + (sv.saved_usd >= 0 ? "good" : "bad"), "data-testid": "saved", text: `${usd(sv.saved_usd)}${sv.saved_share === null ? "" : " (" + pct(sv.saved_share) + ")"}` }))),
    unpriced && sv.reference_cost_usd !== null
      ? h("p", { class: "hint", "data-testid": "savings-left-out", text: `Left out of both totals: ${unpriced} bucket${unpriced === 1 ? "" : "s"} with no price for the reference (basis "unknown").` })
      : null,
    h("p", { "data-testid": "success-delta", text: delta === null
      ? "Success rate delta: not enough scored requests on both sides yet."
      : `Success rate: routed ${pct(sv.actual_success_rate, 1)} vs always-${shortArm(sv.reference)} ${pct(sv.reference_success_rate, 1)} (${delta >= 0 ? "+" : ""}${(100 * delta).toFixed(1)} points)` }),
    h("div", { class: "table-scroll short" }, h("table", { class: "grid" }, h("thead", {}, h("tr", {}, ["bucket", "requests", "actual", "reference", "basis", "success actual / ref"].map((t, i) => h("th", { class: i && i < 4 ? "num" : "", text: t })))),
      h("tbody", {}, sv.buckets.map((b) => h("tr", {}, h("td", { text: b.bucket }), h("td", { class: "num", "data-testid": "savings-requests", text: count(b.requests) + (b.failed_requests ? ` (${count(b.failed_requests)} failed)` : "") }),
        h("td", { class: "num", text: usd(b.actual_cost_usd) }), h("td", { class: "num", text: usd(b.reference_cost_usd) }),
        h("td", { text: b.reference_cost_basis.replace(/_/g, " ") }), h("td", { text: `${pct(b.actual_success_rate)} / ${pct(b.reference_success_rate)}` })))))));
}

// -- latency and shares ----------------------------------------------------------------------------

function renderLatency(rows) {
  const root = $("latency-chart");
  if (!rows.length) { fill(root, h("p", { class: "empty", text: nothingYet("No requests yet.") })); return; }
  const width = 560, rowH = 30, m = { l: 190, r: 70, t: 4 }, height = m.t + rows.length * rowH + 4;
  const max = Math.max(...rows.map((r) => r.p95_latency_ms ?? 0), 1);
  const X = scale(0, max, m.l, width - m.r, false);
  // an arm that never answered has no latency (null): said, not drawn as the fastest arm at 0 ms
  const read = rows.map((r) => `${r.arm}: ` + (r.p95_latency_ms === null ? "no answers" : `p50 ${ms(r.p50_latency_ms)}, p95 ${ms(r.p95_latency_ms)}`)).join("; ");
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `Latency per arm. ${read}`, "data-testid": "latency-svg" });
  rows.forEach((r, i) => {
    const y = m.t + i * rowH;
    const g = s("g", { "data-testid": "latency-row", "data-arm": r.arm });
    g.append(titled(s("text", { class: "value-label", x: m.l - 8, y: y + 17, "text-anchor": "end", text: clip(shortArm(r.arm), 30) }), r.arm));
    if (r.p95_latency_ms === null) {
      g.append(s("text", { x: m.l + 4, y: y + 17, "data-testid": "latency-none", text: `no answers: ${count(r.requests)} request${r.requests === 1 ? "" : "s"}, none answered`  }));
      svg.append(g);
      return;
    }
    g.append(titled(s("rect", { class: "p95", x: m.l, y: y + 3, height: 10, width: Math.max(X(r.p95_latency_ms) - m.l, 1) }), `p95 ${ms(r.p95_latency_ms)}`));
    g.append(titled(s("rect", { class: "p50", x: m.l, y: y + 14, height: 10, width: Math.max(X(r.p50_latency_ms) - m.l, 1) }), `p50 ${ms(r.p50_latency_ms)}`));
    g.append(s("text", { class: "value-label", x: X(r.p95_latency_ms) + 4, y: y + 12, text: ms(r.p95_latency_ms) }));
    g.append(s("text", { x: X(r.p50_latency_ms) + 4, y: y + 23, text: ms(r.p50_latency_ms) }));
    svg.append(g);
  });
  fill(root, svg);
}

function stacked(label, rows, colors, testid) {
  const width = 560, height = 34, m = { l: 70 };
  const read = rows.map((r) => `${r.name} ${pct(r.share, 1)}`).join(", ");
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `Share of requests by ${label}: ${read}`, "data-testid": testid });
  svg.append(s("text", { class: "value-label", x: 0, y: 20, text: label }));
  let x = m.l;
  const span = width - m.l;
  rows.forEach((r, i) => {
    const w = r.share * span;
    const fill = colors[r.name] || ["#0f766e", "#f59e0b", "#6366f1", "#ec4899", "#84cc16"][i % 5];
    svg.append(titled(s("rect", { x, y: 6, width: Math.max(w, 0), height: 22, fill, "data-testid": "share-segment", "data-name": r.name, "data-share": r.share }), `${r.name}: ${pct(r.share, 1)} (${count(r.requests)} requests)`));
    const text = `${r.name} ${pct(r.share)}`;
    if (w > text.length * 6 + 10) svg.append(s("text", { x: x + 5, y: 21, style: "fill:#fff", text }));
    x += w;
  });
  const legend = h("div", { class: "legend" }, rows.map((r, i) => h("span", {}, h("i", { style: `background:${colors[r.name] || ["#0f766e", "#f59e0b", "#6366f1", "#ec4899", "#84cc16"][i % 5]}` }), `${r.name} ${pct(r.share, 1)}`)));
  return h("div", {}, svg, legend);
}

function renderShares(shares) {
  if (!shares.strategy.length) { fill($("shares"), h("p", { class: "empty", text: nothingYet("No requests yet.") })); return; }
  fill($("shares"), stacked("strategy", shares.strategy, STRATEGY_COLORS, "strategy-shares"),
    stacked("effort", shares.effort, EFFORT_COLORS, "effort-shares"));
}

// -- recent requests and one request's reasons -----------------------------------------------------

function renderRequests(rows, readable) {
  const head = h("tr", {}, ["time (UTC)", "bucket", "arm", "mode", "samples", "cost", "latency", "status"].map((t, i) => h("th", { class: i >= 4 && i <= 6 ? "num" : "", text: t })));
  const body = h("tbody", {}, rows.map((r) => {
    // a row opens with a click, or from the keyboard (Tab to it, Enter or Space)
    const tr = h("tr", { "data-testid": "request-row", "data-request-id": r.request_id, class: r.request_id === state.selected ? "selected" : "",
      tabindex: 0, onclick: () => openRequest(r.request_id),
      onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); openRequest(r.request_id); } } },
      h("td", { title: stamp(r.ts), text: time(r.ts) }), h("td", { text: r.bucket }), h("td", { title: r.arm, text: clip(shortArm(r.arm), 40) }),
      h("td", {}, r.policy === "direct" ? h("span", { class: "tag", text: "direct" }) : h("span", { class: "tag" + (r.explore ? " explore" : ""), text: r.explore ? "explore" : "exploit" })),
      h("td", { class: "num", text: r.samples }), h("td", { class: "num", text: usd(r.cost_usd) }), h("td", { class: "num", text: ms(r.latency_ms) }),
      h("td", {}, h("span", { class: "tag " + (r.status < 400 ? "ok" : "err"), text: r.status })));
    return tr;
  }));
  // the store unreachable: only this gateway's buffered requests came back, which is not "none yet"
  if (!readable) body.prepend(h("tr", {}, h("td", { colspan: head.children.length, class: "empty error", "data-testid": "requests-unreadable",
    text: `Telemetry store unreachable: ${rows.length ? `only the ${rows.length} request(s) this gateway still holds in memory` : "no requests to show"} until it is back.` })));
  else if (!rows.length) body.append(h("tr", {}, h("td", { colspan: head.children.length, class: "empty", "data-testid": "requests-empty", text: "No requests yet." })));
  const focused = document.activeElement?.dataset.testid === "request-row" ? document.activeElement.dataset.requestId : null;
  fill($("requests"), h("thead", {}, head), body);
  // the refresh redraws the rows: the keyboard's place stays on the same request
  if (focused) [...body.children].find((tr) => tr.dataset.requestId === focused)?.focus();
}

async function openRequest(id) {
  state.selected = id;
  for (const tr of document.querySelectorAll("[data-testid=request-row]")) tr.classList.toggle("selected", tr.dataset.requestId === id);
  const root = $("detail");
  fill(root, h("p", { class: "hint", text: "loading…" }));
  let d;
  try {
    d = await api("/v1/ponder/requests/" + encodeURIComponent(id));
  } catch (err) {
    if (err instanceof AuthError) return showLogin(err.message);
    if (state.selected === id) fill(root, h("p", { class: "error", text: err.message }));
    return;
  }
  // another row was picked while this one's reasons were on their way: its answer must not replace them
  if (state.selected !== id) return;
  const r = d.request, c = d.classifier, dec = d.decision, ex = d.execution;
  const probs = Object.entries(c.task_probs || {}).sort((a, b) => b[1] - a[1]);
  const kv = (pairs) => h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
  fill(root, 
    h("h2", { text: "Why this arm" }),
    h("p", { class: "hint", text: r.request_id }),
    kv([["arm", h("b", { "data-testid": "detail-arm", text: dec.arm })], ["policy", dec.policy], ["time", stamp(r.ts)],
      ["mode", h("span", { "data-testid": "detail-mode", text: dec.policy === "direct" ? "direct (client named a backend)" : dec.explore ? "explore" : "exploit" })],
      ["cost", usd(r.cost_usd)], ["latency", ms(r.latency_ms)], ["tokens", `${r.prompt_tokens} in · ${r.completion_tokens} out · ${r.reasoning_tokens} reasoning`],
      ["status", String(r.status) + (r.error ? " — " + r.error : "")]]),
    h("h3", { text: "Classifier" }),
    kv([["task", h("span", { "data-testid": "detail-task", text: c.task })], ["difficulty", (c.difficulty ?? 0).toFixed(3) + "  (" + c.bucket + ")"],
      ["task probabilities", h("div", {}, probs.map(([t, p]) => h("div", {}, h("span", { class: "probbar", style: `width:${Math.round(80 * p)}px` }), `${t} ${pct(p, 1)}`)))]]),
    h("h3", { text: "Reasons" }),
    h("ol", { "data-testid": "detail-reasons" }, dec.reasons.map((t) => h("li", { text: t }))),
    h("h3", { text: "Candidates" }),
    dec.candidates.length ? h("table", { class: "grid", "data-testid": "detail-candidates" },
      h("thead", {}, h("tr", {}, ["arm", "P(correct)", "exp. cost", "exp. latency", "utility", "excluded"].map((t, i) => h("th", { class: i && i < 5 ? "num" : "", text: t })))),
      h("tbody", {}, dec.candidates.map((k) => h("tr", { class: k.chosen ? "chosen" : "", "data-testid": "candidate-row" },
        h("td", { title: k.arm, text: clip(shortArm(k.arm), 40) }), h("td", { class: "num", text: pct(k.expected_accuracy, 1) }),
        h("td", { class: "num", text: usd(k.expected_cost_usd) }), h("td", { class: "num", text: ms(k.expected_latency_ms) }),
        h("td", { class: "num", text: (k.utility ?? 0).toFixed(4) }), h("td", { text: k.excluded || "" })))))
      : h("p", { class: "hint", text: "No candidates: the client named a backend directly." }),
    h("h3", { text: "Samples and votes" }),
    kv([["samples", h("span", { "data-testid": "detail-samples", text: ex.samples })], ["backend calls", String(ex.calls.length)]]),
    ex.votes ? h("pre", { "data-testid": "detail-votes", text: JSON.stringify(ex.votes, null, 1) }) : null,
    h("table", { class: "grid" }, h("thead", {}, h("tr", {}, ["backend", "tokens in/out", "cost", "latency", "ok"].map((t) => h("th", { text: t })))),
      h("tbody", {}, ex.calls.map((k) => h("tr", {}, h("td", { text: k.backend }), h("td", { text: `${k.prompt_tokens ?? 0}/${k.completion_tokens ?? 0}` }),
        h("td", { text: usd(k.cost_usd) }), h("td", { text: ms(k.latency_ms) }), h("td", { text: k.ok ? "yes" : (k.error || "no") }))))));
}

// -- eval report -----------------------------------------------------------------------------------

async function openReport(file) {
  const root = $("report-chart");
  fill(root, h("p", { class: "hint", text: "reading " + file.name + "…" }));
  try {
    const report = await api("/v1/ponder/report", { method: "POST", headers: { "content-type": "application/json" }, body: await file.text() });
    if (!report.points.length) { fill(root, h("p", { class: "empty", text: "No cost/accuracy pairs found in this report." })); return; }
    const fmt = report.cost_unit && report.cost_unit.includes("usd") || report.cost_unit === "cost" ? usdTick : (v) => (v >= 100 ? v.toFixed(0) : v.toPrecision(3));
    // Points of one method (its operating points, `.../points/3`) share a colour and a legend entry.
    const groupOf = (name) => name.replace(/ \/ (points \/ )?\d+$/, "").replace(/^methods \/ /, "");
    const groups = [...new Set(report.points.map((p) => groupOf(p.name)))];
    const colour = (g) => nthColor(groups.indexOf(g));
    const points = report.points.map((p) => ({
      key: p.name, label: groupOf(p.name), x: p.cost, y: p.accuracy, r: 5, color: colour(groupOf(p.name)),
      pareto: p.pareto, testid: "report-point", rings: [],
      tip: `${p.name}\n${report.cost_unit}: ${p.cost}\naccuracy ${pct(p.accuracy, 1)}${p.pareto ? "\non the Pareto frontier" : ""}`,
    }));
    fill(root, 
      h("p", { class: "hint", text: `${report.title || file.name}: ${report.points.length} points, x = ${report.cost_unit}` +
        (Object.keys(report.left_out).length ? ` (left out, other units: ${JSON.stringify(report.left_out)})` : "") }),
      scatter(points, { xLabel: report.cost_unit, xFormat: fmt, testid: "report-scatter", width: 900, height: 320, yLabel: "accuracy",
        name: `${report.title || file.name}: ${report.cost_unit} and accuracy of each point` }),
      h("div", { class: "legend" }, groups.map((g) => h("span", {}, h("i", { style: `background:${colour(g)}` }), g))));
  } catch (err) {
    if (err instanceof AuthError) return showLogin(err.message);
    fill(root, h("p", { class: "error", text: err.message }));
  }
}

// -- wiring ----------------------------------------------------------------------------------------

function boot() {
  // `/dashboard#key=...` logs in without the key ever being sent in a URL (fragments stay in the browser).
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("key")) {
    state.key = fragment.get("key");
    sessionStorage.setItem(KEY_STORAGE, state.key);
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $("key-input").value = "";
    refresh();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); state.key = ""; showLogin(""); });
  $("policy").addEventListener("change", (ev) => { state.policy = ev.target.value; state.reference = ""; refresh(); });
  $("reference").addEventListener("change", (ev) => { state.reference = ev.target.value; refresh(); });
  $("live").addEventListener("change", () => (($("live").checked) ? refresh() : stopTimer()));
  for (const tab of document.querySelectorAll("[data-spend]")) {
    tab.addEventListener("click", () => {
      state.spendMode = tab.dataset.spend;
      document.querySelectorAll("[data-spend]").forEach((t) => {
        t.classList.toggle("active", t === tab);
        t.setAttribute("aria-selected", String(t === tab));
      });
      renderSpend();
    });
  }
  $("report-file").addEventListener("change", (ev) => { if (ev.target.files[0]) openReport(ev.target.files[0]); });
  refresh();
}

document.addEventListener("DOMContentLoaded", boot);
