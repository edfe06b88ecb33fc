/*
 * pagoda console: the playground (streams chat/completion requests and times them) and the
 * dashboard (polls GET /v1/cluster/status and draws the last minutes of it).
 *
 * Plain ES2020 with no dependency: the page is served by the Python package itself, so it must
 * work offline and without a build step. Every API call goes through `api()`, which adds the
 * Bearer key kept in sessionStorage and opens the key prompt on a 401.
 *
 * NOTE: index.html loads this file as a module: its names stay out of `window` (where `stop` or
 * `history` would clash with the browser's own), it runs in strict mode and after the page is parsed.
 */

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "pagoda.apiKey";
const POLL_MS = 1500;
const HISTORY_S = 300;   // how far back the dashboard charts look

// ---------------------------------------------------------------- API key and errors

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

// A 401 means the server wants a key we do not have (or a wrong one): point at the header input.
function askForKey() {
  $("key-form").classList.add("attention");
  showError("This server needs an API key: enter it above and press Save.");
  // NOTE: the dashboard's polls repeat this every 1.5 s: never steal focus from another text field
  const typing = document.activeElement && document.activeElement.matches("input, textarea, select");
  if (!typing) $("api-key").focus();
}

// fetch() with the key attached; a 401 opens the key prompt (the caller still sees the response).
async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) askForKey();
  return response;
}

// The message of an OpenAI error body ({"error": {"message": ...}}), else the raw text.
async function errorText(response) {
  const text = await response.text();
  let message = text || response.statusText;
  try {
    const body = JSON.parse(text);
    message = (body.error && body.error.message) || body.detail || message;
  } catch (_) { /* not JSON: keep the text */ }
  return `HTTP ${response.status}: ${message}`;
}

// ---------------------------------------------------------------- tabs

function showTab(name) {
  for (const tab of ["playground", "dashboard"]) {
    const active = tab === name;
    $(tab).hidden = !active;
    $(`tab-${tab}`).setAttribute("aria-selected", String(active));
  }
  // the address remembers the tab, so a reload (or a shared link) opens the same one
  history.replaceState(null, "", name === "dashboard" ? "#dashboard" : location.pathname + location.search);
  if (name === "dashboard") startPolling();
}

// ---------------------------------------------------------------- playground: the request

async function loadModels() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    const select = $("model");
    const previous = select.value;
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    if (body.data.some((m) => m.id === previous)) select.value = previous;
  } catch (error) {
    if (!$("key-form").classList.contains("attention")) showError(`Could not list models: ${error.message}`);
  }
}

// A number field's value, or undefined when blank (the server's default then applies).
function numberField(id, name, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${name} must be ${integer ? "an integer" : "a number"}, got ${JSON.stringify(raw)}`);
  }
  return value;
}

// The chat turns so far ({role, content}); the system prompt is prepended at send time.
const conversation = [];
let lastCompletion = "";
let lastRequest = null;

// The request Send would make now: {path, body}. Throws an Error naming the bad field.
function buildRequest() {
  const chat = $("mode").value === "chat";
  const body = { model: $("model").value };
  const prompt = $("prompt").value;
  if (chat) {
    const system = $("system").value.trim();
    body.messages = [
      ...(system ? [{ role: "system", content: system }] : []),
      ...conversation,
      { role: "user", content: prompt },
    ];
  } else {
    body.prompt = prompt;
  }
  const fields = [["temperature", "temperature", false], ["top-p", "top_p", false],
    ["max-tokens", "max_tokens", true], ["seed", "seed", true]];
  for (const [id, name, integer] of fields) {
    const value = numberField(id, name, integer);
    if (value !== undefined) body[name] = value;
  }
  // NOTE: a literal \n in the stop box means a newline, the usual stop sequence people want.
  const stop = $("stop").value.split(",").map((s) => s.trim().replace(/\\n/g, "\n")).filter(Boolean);
  if (stop.length) body.stop = stop;
  const schemaText = $("schema").value.trim();
  if (schemaText) {
    let schema;
    try {
      schema = JSON.parse(schemaText);
    } catch (error) {
      throw new Error(`JSON schema is not valid JSON: ${error.message}`);
    }
    if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
      throw new Error("JSON schema must be a JSON object");
    }
    body.response_format = { type: "json_schema", json_schema: { name: "schema", schema } };
  }
  body.stream = true;
  body.stream_options = { include_usage: true };
  return { path: chat ? "/v1/chat/completions" : "/v1/completions", body };
}

// ---------------------------------------------------------------- playground: output

function renderOutput(pendingText) {
  const out = $("output");
  if ($("mode").value === "completion") {
    out.replaceChildren(el("div", pendingText ?? lastCompletion, "msg completion"));
    return;
  }
  const turns = conversation.map((m) => messageDiv(m.role, m.content));
  if (pendingText !== undefined) turns.push(messageDiv("assistant", pendingText));
  out.replaceChildren(...turns);
  out.scrollTop = out.scrollHeight;
}

function messageDiv(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  return div;
}

// ---------------------------------------------------------------- playground: streaming

let controller = null;

function setRunning(running, note) {
  $("send").disabled = running;
  $("stop-button").disabled = !running;
  $("run-state").textContent = note || "";
}

async function sendRequest() {
  showError("");
  let request;
  try {
    request = buildRequest();
  } catch (error) {
    showError(error.message);   // nothing is sent
    return;
  }
  if (!request.body.model) {
    showError("No model to send to: the model list is empty (is the API key set?)");
    return;
  }
  lastRequest = request;
  const chat = request.path === "/v1/chat/completions";
  const prompt = $("prompt").value;
  if (chat) {
    conversation.push({ role: "user", content: prompt });
    $("prompt").value = "";
  }
  $("ttft").textContent = "–";
  $("tps").textContent = "–";
  controller = new AbortController();
  setRunning(true, "streaming…");

  let text = "";
  let usage = null;
  let chunks = 0;
  let firstAt = null;
  let note = "done";
  const startedAt = performance.now();
  renderOutput(text);
  try {
    const response = await api(request.path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request.body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of sseEvents(response.body)) {
      if (event.error) {
        showError(event.error.message || JSON.stringify(event.error));
        note = "failed";
        continue;
      }
      if (event.usage) usage = event.usage;
      const choice = (event.choices || [])[0];
      const piece = choice ? (chat ? (choice.delta && choice.delta.content) : choice.text) : "";
      if (piece) {
        if (firstAt === null) {
          firstAt = performance.now();
          $("ttft").textContent = (firstAt - startedAt).toFixed(0);
        }
        chunks += 1;
        text += piece;
        renderOutput(text);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      note = "stopped";
    } else {
      showError(error.message);
      note = "failed";
    }
  }
  const endedAt = performance.now();
  if (chat && !text) {
    // nothing came back (error or an early Stop): give the prompt back instead of a dangling turn
    conversation.pop();
    $("prompt").value = prompt;
  } else if (chat) {
    conversation.push({ role: "assistant", content: text });
  } else {
    lastCompletion = text;
  }
  renderOutput();
  showRate(usage ? usage.completion_tokens : chunks, firstAt, endedAt, startedAt);
  controller = null;
  setRunning(false, note);
}

// Decode speed: tokens after the first over the time after the first; with one token, over all.
function showRate(tokens, firstAt, endedAt, startedAt) {
  if (!tokens || firstAt === null) return;
  const rate = tokens > 1 && endedAt > firstAt
    ? (tokens - 1) / ((endedAt - firstAt) / 1000)
    : tokens / ((endedAt - startedAt) / 1000);
  $("tps").textContent = rate.toFixed(1);
  $("tps").title = `${tokens} tokens`;
}

// Yields the JSON payload of every `data:` line of a server-sent-event stream until [DONE].
async function* sseEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();           // a partial line waits for the next read
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function stopStream() {
  if (controller) controller.abort();
}

function clearChat() {
  conversation.length = 0;
  lastCompletion = "";
  renderOutput();
}

// ---------------------------------------------------------------- playground: copy as code

// The last request sent, or the one Send would make when the prompt box holds a new prompt.
function requestToCopy() {
  if ($("prompt").value.trim() || !lastRequest) return buildRequest();
  return lastRequest;
}

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

function curlSnippet({ path, body }) {
  const lines = [`curl -N ${location.origin}${path}`, `-H "Content-Type: application/json"`];
  if (apiKey()) lines.push(`-H "Authorization: Bearer $PAGODA_API_KEY"`);
  lines.push(`-d ${shellQuote(JSON.stringify(body, null, 2))}`);
  return lines.join(" \\\n  ");
}

// A JSON value as a Python literal (True/False/None; strings as JSON strings, which Python reads).
function pyLiteral(value, indent) {
  const pad = "    ".repeat(indent + 1);
  const end = "    ".repeat(indent);
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => pad + pyLiteral(v, indent + 1)).join(",\n")},\n${end}]`;
  }
  if (typeof value === "object") {
    const items = Object.entries(value).map(([k, v]) => `${pad}${JSON.stringify(k)}: ${pyLiteral(v, indent + 1)}`);
    return items.length ? `{\n${items.join(",\n")},\n${end}}` : "{}";
  }
  return JSON.stringify(value);
}

function pythonSnippet({ path, body }) {
  const chat = path === "/v1/chat/completions";
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${pyLiteral(v, 1)},`).join("\n");
  const key = apiKey() ? 'os.environ["PAGODA_API_KEY"]' : '"unused"';
  const piece = chat ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`,
    `stream = client.${chat ? "chat.completions" : "completions"}.create(`,
    args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    `        print(${piece}, end="", flush=True)`,
    "print()",
  ].join("\n");
}

async function copySnippet(kind) {
  showError("");
  let request;
  try {
    request = requestToCopy();
  } catch (error) {
    showError(error.message);
    return;
  }
  const snippet = kind === "curl" ? curlSnippet(request) : pythonSnippet(request);
  $("copied").value = snippet;    // readable without clipboard access
  try {
    await navigator.clipboard.writeText(snippet);
  } catch (_) { /* no clipboard (http, permissions): the box above still shows it */ }
}

// ---------------------------------------------------------------- dashboard: polling

const snapshots = [];   // [{t: seconds, rows: Map("model/replica" -> replica stats)}]
let polling = false;   // a poll is in flight or scheduled: never start a second loop

function startPolling() {
  if (polling) return;
  polling = true;
  poll();
}

// Polls while the dashboard tab is shown and the page visible; a failed poll keeps trying.
async function poll() {
  if ($("dashboard").hidden || document.visibilityState !== "visible") {
    polling = false;
    return;
  }
  const status = $("last-refresh");
  try {
    const response = await api("/v1/cluster/status");
    if (!response.ok) throw new Error(await errorText(response));
    const snapshot = await response.json();
    record(snapshot);
    renderModels(snapshot);
    drawCharts();
    status.textContent = `Last refresh ${new Date().toLocaleTimeString()} (${snapshot.mode}, ` +
      `latencies and tokens/s over the last ${snapshot.window_s} s)`;
    status.classList.remove("failing");
  } catch (error) {
    status.textContent = `Refresh failed at ${new Date().toLocaleTimeString()}: ${error.message} (retrying)`;
    status.classList.add("failing");
  }
  setTimeout(poll, POLL_MS);
}

function record(snapshot) {
  const rows = new Map();
  for (const model of snapshot.models) {
    for (const r of model.replica_stats) rows.set(`${model.name}/${r.replica}`, r);
  }
  // NOTE: the page's clock, not the server's: points stay evenly spaced even if clocks differ.
  const t = Date.now() / 1000;
  snapshots.push({ t, rows });
  while (snapshots.length && snapshots[0].t < t - HISTORY_S) snapshots.shift();
}

// ---------------------------------------------------------------- dashboard: tables

const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)}`);
const ms = (x) => (x == null ? "–" : x.toFixed(1));
const pair = (q) => (q ? `${ms(q.p50)} / ${ms(q.p99)}` : "–");

const COLUMNS = [
  ["state", "state", (r) => r.state],
  ["running", "running", (r) => r.running],
  ["waiting", "waiting", (r) => r.waiting],
  ["kv", "KV use %", (r) => pct(r.kv_cache_usage)],
  ["prefix", "prefix hit %", (r) => pct(r.prefix_cache_hit_rate)],
  ["tps", "tokens/s", (r) => r.generation_tokens_per_s.toFixed(1)],
  ["ttft", "TTFT p50 / p99 ms", (r) => pair(r.ttft_ms)],
  ["itl", "ITL p50 / p99 ms", (r) => pair(r.itl_ms)],
  ["preemptions", "preemptions", (r) => r.num_preemptions],
];

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function renderModels(snapshot) {
  const sections = snapshot.models.map((model) => {
    const section = el("section", undefined, "model");
    const r = model.replicas;
    section.append(
      el("h2", model.name),
      el("p", `replicas ${r.current} / ${r.target} (${r.min}-${r.max}) · max_model_len ${model.max_model_len}`, "muted"));
    const table = el("table");
    const head = el("tr");
    head.append(el("th", "replica"), ...COLUMNS.map(([, title]) => el("th", title)));
    table.append(el("thead"), el("tbody"));
    table.tHead.append(head);
    for (const stats of model.replica_stats) {
      const row = el("tr");
      row.dataset.replica = stats.replica;
      row.append(el("td", stats.replica, "replica"), ...COLUMNS.map(([cls, , value]) => el("td", value(stats), cls)));
      row.querySelector(".state").classList.add(`state-${stats.state}`);
      table.tBodies[0].append(row);
    }
    const wrap = el("div", undefined, "table-wrap");
    wrap.append(table);
    section.append(wrap);
    return section;
  });
  if (!sections.length) sections.push(el("p", "No models are served.", "muted"));
  $("models").replaceChildren(...sections);
}

// ---------------------------------------------------------------- dashboard: charts

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const CHARTS = [
  ["chart-tps", (r) => r.generation_tokens_per_s],
  ["chart-queue", (r) => r.running + r.waiting],
  ["chart-kv", (r) => 100 * r.kv_cache_usage],
  ["chart-ttft", (r) => (r.ttft_ms ? r.ttft_ms.p50 : null)],
];

function drawCharts() {
  const keys = [...new Set(snapshots.flatMap((h) => [...h.rows.keys()]))];
  const color = (i) => COLORS[i % COLORS.length];
  for (const [id, metric] of CHARTS) drawChart($(id), keys, metric, color);
  $("legend").replaceChildren(...keys.map((key, i) => {
    const item = el("span", key, "item");
    item.style.setProperty("--swatch", color(i));
    return item;
  }));
}

// One line per replica over the last HISTORY_S seconds; a null value (no TTFT yet) breaks the line.
function drawChart(canvas, keys, metric, color) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 160;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const now = Date.now() / 1000;
  const values = snapshots.flatMap((h) => keys.map((k) => (h.rows.has(k) ? metric(h.rows.get(k)) : null)));
  const max = Math.max(1e-9, ...values.filter((v) => v != null)) * 1.1;
  const left = 40, right = 6, top = 8, bottom = 16;
  const x = (t) => left + (width - left - right) * (1 - (now - t) / HISTORY_S);
  const y = (v) => top + (height - top - bottom) * (1 - v / max);

  // axes: the max value, zero, and the time span
  ctx.strokeStyle = "#d1d5db";
  ctx.fillStyle = "#6b7280";
  ctx.font = "10px system-ui, sans-serif";
  ctx.beginPath();
  ctx.moveTo(left, top);
  ctx.lineTo(left, height - bottom);
  ctx.lineTo(width - right, height - bottom);
  ctx.stroke();
  ctx.fillText(formatAxis(max / 1.1), 2, top + 8);
  ctx.fillText("0", 2, height - bottom);
  ctx.fillText(`-${HISTORY_S / 60} min`, left, height - 3);
  ctx.fillText("now", width - right - 20, height - 3);

  keys.forEach((key, i) => {
    ctx.strokeStyle = color(i);
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let drawing = false;
    for (const h of snapshots) {
      const v = h.rows.has(key) ? metric(h.rows.get(key)) : null;
      if (v == null) { drawing = false; continue; }
      if (drawing) ctx.lineTo(x(h.t), y(v));
      else ctx.moveTo(x(h.t), y(v));
      drawing = true;
    }
    ctx.stroke();
  });
}

function formatAxis(v) {
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

// ---------------------------------------------------------------- wiring

function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("key-form").classList.remove("attention");
    showError("");
    loadModels();
  });
  $("tab-playground").addEventListener("click", () => showTab("playground"));
  $("tab-dashboard").addEventListener("click", () => showTab("dashboard"));
  const onMode = () => {
    document.body.classList.toggle("completion-mode", $("mode").value === "completion");
    renderOutput();
  };
  $("mode").addEventListener("change", onMode);
  onMode();   // a reloaded page may come back with the form's old mode
  $("send").addEventListener("click", sendRequest);
  $("stop-button").addEventListener("click", stopStream);
  $("clear").addEventListener("click", clearChat);
  $("copy-curl").addEventListener("click", () => copySnippet("curl"));
  $("copy-python").addEventListener("click", () => copySnippet("python"));
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("send").disabled) sendRequest();
  });
  document.addEventListener("visibilitychange", () => {
    if (!$("dashboard").hidden) startPolling();
  });
  window.addEventListener("resize", () => { if (!$("dashboard").hidden) drawCharts(); });
  const tabFromAddress = () => showTab(location.hash === "#dashboard" ? "dashboard" : "playground");
  window.addEventListener("hashchange", tabFromAddress);
  tabFromAddress();
  loadModels();
}

init();
