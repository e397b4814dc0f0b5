// The dashboard: polls GET status every second and draws what it says. The server keeps
// the last minute's per-second tokens and recent step sizes; the series of gauges
// (running, waiting, KV use, percentiles) are kept here, one point per poll.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const HISTORY = 120; // points kept per client-side series: two minutes
const history = { running: [], waiting: [], kv: [], ttft50: [], ttft99: [], itl50: [], itl99: [] };

function push(name, value) {
  const series = history[name];
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

function percent(fraction) {
  return fraction === null || fraction === undefined ? "–" : (100 * fraction).toFixed(1) + " %";
}

function millis(seconds) {
  return seconds === null ? "–" : seconds < 1 ? Math.round(seconds * 1000) + " ms"
    : seconds.toFixed(2) + " s";
}

function triple(p) {
  return p.count ? [p.p50, p.p90, p.p99].map(millis).join(" / ") : "no samples";
}

// Draw each series of `lines` ([{values, cls}]) as a polyline in the 300x80 `svg`,
// scaled to the largest value (at least `floor`); returns that maximum.
function drawChart(svg, lines, floor = 1) {
  const all = lines.flatMap((line) => line.values.filter((v) => v !== null));
  const max = Math.max(floor, ...all);
  const nodes = [];
  for (const { values, cls } of lines) {
    if (values.length < 2) continue;
    const step = 300 / (Math.max(values.length, 2) - 1);
    const points = values.map((v, i) => (i * step).toFixed(1) + "," +
      (78 - (76 * (v === null ? 0 : v)) / max).toFixed(1)).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points);
    line.setAttribute("class", "line " + cls);
    nodes.push(line);
  }
  svg.replaceChildren(...nodes);
  return max;
}

function showFacts(status) {
  const rows = [["version", status.version], ["uptime", formatUptime(status.uptime_s)]];
  if (status.model) {
    const m = status.model;
    rows.push(["model", m.name], ["device", m.device], ["dtype", m.dtype],
      ["context window", m.max_model_len + " tokens"]);
    for (const [name, value] of Object.entries(m.kernels || {})) rows.push(["kernels: " + name, value]);
  }
  for (const [name, value] of Object.entries(status.settings)) rows.push([name, String(value)]);
  $("facts").replaceChildren(...rows.map(([name, value]) => {
    const row = element("tr");
    row.appendChild(element("th", { scope: "row" }, name));
    row.appendChild(element("td", {}, String(value ?? "–")));
    return row;
  }));
}

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return (h ? h + " h " : "") + (h || m ? m + " min " : "") + (s % 60) + " s";
}

function show(status) {
  const engine = status.engine;
  const minute = status.last_minute;
  $("phase").textContent = status.phase + (engine && !engine.alive ? " (engine stopped)" : "");
  $("running").textContent = engine ? engine.running : "–";
  $("waiting").textContent = engine ? engine.waiting : "–";
  $("kv").textContent = engine ? percent(engine.kv_cache_usage) : "–";
  $("prefix").textContent = engine ? percent(engine.prefix_cache_hit_rate) : "–";
  $("preemptions").textContent = engine ? engine.preemptions : "–";
  $("tps").textContent = minute.output_tokens_per_s.toFixed(1);
  $("ttft").textContent = triple(minute.ttft_s);
  $("itl").textContent = triple(minute.itl_s);
  $("steps").textContent = minute.steps;
  const errors = Object.entries(status.errors_by_reason).filter(([, n]) => n > 0);
  $("errors").textContent = errors.length
    ? errors.map(([reason, n]) => reason + " " + n).join(", ") : "none";
  showFacts(status);

  push("running", engine ? engine.running : 0);
  push("waiting", engine ? engine.waiting : 0);
  push("kv", engine ? 100 * engine.kv_cache_usage : 0);
  push("ttft50", minute.ttft_s.p50);
  push("ttft99", minute.ttft_s.p99);
  push("itl50", minute.itl_s.p50);
  push("itl99", minute.itl_s.p99);
  const maxLoad = drawChart($("chart-load"), [
    { values: history.running, cls: "running" }, { values: history.waiting, cls: "waiting" }]);
  $("max-load").textContent = "(top " + maxLoad + ")";
  const maxTps = drawChart($("chart-tps"), [{ values: minute.output_tokens_per_second, cls: "running" }]);
  $("max-tps").textContent = "(top " + maxTps + ")";
  drawChart($("chart-kv"), [{ values: history.kv, cls: "running" }], 100);
  $("max-kv").textContent = "(top 100 %)";
  const maxBatch = drawChart($("chart-batch"), [{ values: minute.recent_batch_sizes, cls: "running" }]);
  $("max-batch").textContent = "(top " + maxBatch + ")";
  const maxTtft = drawChart($("chart-ttft"), [
    { values: history.ttft50, cls: "running" }, { values: history.ttft99, cls: "waiting" }], 0.001);
  $("max-ttft").textContent = "(top " + millis(maxTtft) + ")";
  const maxItl = drawChart($("chart-itl"), [
    { values: history.itl50, cls: "running" }, { values: history.itl99, cls: "waiting" }], 0.001);
  $("max-itl").textContent = "(top " + millis(maxItl) + ")";
}

async function poll() {
  try {
    const response = await apiFetch("status");
    if (response.status === 401) { // the key prompt was dismissed: stop asking every second
      $("phase").textContent = "needs an API key";
      $("error").textContent = "status: " + (await errorText(response)) + " Reload to enter a key.";
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    show(await response.json());
    $("error").textContent = "";
  } catch (err) {
    $("phase").textContent = "unreachable";
    $("error").textContent = "status: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
