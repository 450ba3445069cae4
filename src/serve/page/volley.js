// The status page: polls GET /api/v1/status with the operator's token every
// POLL_MS and draws it; the queue buttons POST /api/v1/queue. Data goes into the
// page as text only (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "volley-token";
let chart = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function num(n, digits) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits || 0 });
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function showError(text) {
  const p = document.getElementById("error");
  p.textContent = text || "";
  p.hidden = !text;
}

async function api(path, init) {
  const opts = Object.assign({ headers: {} }, init || {});
  opts.headers["Authorization"] = "Bearer " + token();
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) clearData();
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

function stateCell(row) {
  const td = el("td");
  const parts = [];
  let cls = "state-ok";
  if (row.paused) { parts.push("paused"); cls = "state-warn"; }
  if (row.suspended_s > 0) { parts.push("suspended " + duration(row.suspended_s)); cls = "state-bad"; }
  if (row.backed_off > 0 || row.backed_off === true) {
    const f = row.backoff_factor !== undefined && row.backoff_factor < 1 ? " ×" + row.backoff_factor.toFixed(2) : "";
    parts.push("backed off" + f);
    if (cls === "state-ok") cls = "state-warn";
  }
  if (row.operator_rate) parts.push("rate set by operator");
  td.appendChild(el("span", parts.length ? parts.join(", ") : "ok", cls));
  if (row.cause) {
    td.appendChild(el("br"));
    td.appendChild(el("small", row.cause, "muted"));
  }
  return td;
}

async function control(action, key, rate) {
  const body = { action: action, target: key };
  if (rate !== undefined) body.rate = rate;
  try {
    await api("/api/v1/queue", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showError("");
    poll();
  } catch (e) {
    showError(action + " " + key + ": " + e.message);
  }
}

function controlCell(row) {
  const td = el("td", null, "control");
  if (!row.key) return td;
  const pause = el("button", row.paused ? "Resume" : "Pause");
  pause.dataset.action = row.paused ? "resume" : "pause";
  pause.dataset.key = row.key;
  pause.addEventListener("click", () => control(pause.dataset.action, row.key));
  const input = el("input");
  input.placeholder = "10/s";
  input.setAttribute("aria-label", "rate for " + row.key);
  const set = el("button", "Set rate");
  set.dataset.action = "rate";
  set.dataset.key = row.key;
  set.addEventListener("click", () => control("rate", row.key, input.value.trim() || "unlimited"));
  td.append(pause, input, set);
  return td;
}

// A refused token: nothing shown before stays on screen.
function clearData() {
  for (const id of ["providers", "sources", "campaigns", "bounces"]) {
    document.querySelector("#" + id + " tbody").replaceChildren();
  }
  for (const v of document.querySelectorAll("#totals .value")) v.textContent = "–";
}

function fill(id, rows, make) {
  const body = document.querySelector("#" + id + " tbody");
  // Keep a rate being typed: rows are redrawn, not the input the operator is in.
  if (body.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
  body.replaceChildren(...rows.map(make));
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "none", "muted");
    td.colSpan = document.querySelectorAll("#" + id + " thead th").length;
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

function drawChart(history) {
  const xs = [], ys = [];
  for (let i = 1; i < history.length; i++) {
    const dt = history[i][0] - history[i - 1][0];
    xs.push(history[i][0]);
    ys.push(dt > 0 ? (history[i][1] - history[i - 1][1]) / dt : 0);
  }
  const last = ys.length ? ys[ys.length - 1] : null;
  document.getElementById("t-rate").textContent = num(last, 1);
  if (typeof uPlot === "undefined") return;
  const box = document.getElementById("chart");
  const width = Math.max(200, box.clientWidth - 2);
  if (!chart) {
    chart = new uPlot({
      width: width,
      height: 180,
      series: [{}, { label: "delivered/s", stroke: "#1e6b32", fill: "rgba(30,107,50,0.12)" }],
      axes: [
        {
          // Whole seconds at least 80 px apart: a fresh daemon has seconds of data.
          space: 80,
          incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600],
          values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })),
        },
        { size: 50 },
      ],
      legend: { show: false },
    }, [xs, ys], box);
  } else {
    if (chart.width !== width) chart.setSize({ width: width, height: 180 });
    chart.setData([xs, ys]);
  }
}

function render(s) {
  for (const k of ["delivered", "transient_failure", "bounced", "expired"]) {
    document.getElementById("t-" + k).textContent = num(s.totals[k] || 0);
  }
  for (const k of ["ready", "retry", "held"]) {
    document.getElementById("q-" + k).textContent = num(s.queue[k]);
  }
  drawChart(s.history);
  fill("providers", s.providers, (p) => {
    const tr = el("tr");
    tr.dataset.provider = p.provider;
    const limit = p.limit === null ? "unlimited" : num(p.limit, 1);
    const conns = p.connections_cap === null ? num(p.connections) : num(p.connections) + " / " + num(p.connections_cap);
    tr.append(el("td", p.provider), el("td", num(p.rate, 1), "num"), el("td", limit, "num"),
      el("td", conns, "num"), stateCell(p), el("td", num(p.delivered), "num"),
      el("td", num(p.deferred), "num"), el("td", num(p.bounced), "num"), controlCell(p));
    return tr;
  });
  fill("sources", s.sources, (r) => {
    const tr = el("tr");
    tr.dataset.source = r.key;
    let warm = "–";
    if (r.warmup) {
      const cap = r.warmup.cap_today === null ? "no cap" : num(r.warmup.cap_today);
      warm = "day " + r.warmup.day + " of " + r.warmup.days + ": " + num(r.warmup.sent_today) + " / " + cap;
    }
    tr.append(el("td", r.source), el("td", r.destination), el("td", num(r.rate, 1), "num"),
      el("td", warm), stateCell(r));
    return tr;
  });
  fill("campaigns", s.campaigns, (c) => {
    const tr = el("tr");
    tr.dataset.campaign = c.campaign;
    const done = c.delivered + c.bounced + c.expired;
    const pct = c.recipients ? Math.floor(100 * done / c.recipients) : 100;
    const prog = el("td");
    const bar = el("span", null, "bar");
    const fillBar = el("span");
    fillBar.style.width = pct + "%";
    bar.appendChild(fillBar);
    prog.append(bar, el("span", " " + pct + "%"));
    tr.append(el("td", c.campaign + " #" + c.instance), prog, el("td", num(c.delivered), "num"),
      el("td", num(c.bounced), "num"), el("td", num(c.expired), "num"), el("td", num(c.queued), "num"),
      el("td", c.queued === 0 ? "done" : duration(c.eta_s)));
    return tr;
  });
  fill("bounces", s.bounces, (b) => {
    const tr = el("tr");
    const reply = [b.code, b.enhanced, b.reply].filter((x) => x).join(" ");
    tr.append(el("td", b.time.replace("T", " ").replace(/\.\d+Z$/, "Z")), el("td", b.rcpt), el("td", b.campaign),
      el("td", reply, "reply"), el("td", b.outcome === "expired" ? b.class + " (expired)" : b.class));
    return tr;
  });
  const sv = s.service;
  document.getElementById("service").textContent = sv
    ? "spool: " + (sv.spool_free_bytes / 1073741824).toFixed(2) + " GiB free; injection refused below " +
      (sv.spool_free_min_bytes / 1048576).toFixed(0) + " MiB" + (sv.injection_refused_now ? " (REFUSING NOW)" : "") +
      "; " + s.shards + " shards"
    : s.shards + " shards";
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function poll() {
  if (!token()) {
    showError("Enter an API token (volley token add NAME --tokens FILE) to see the status.");
    return;
  }
  try {
    render(await api("/api/v1/status"));
    showError("");
  } catch (e) {
    showError("status: " + e.message);
  }
}

function start() {
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    poll();
  });
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
