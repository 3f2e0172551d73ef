// The gorgon playground: chat and completions streamed from the OpenAI routes, with each token marked by the
// engine step that made it (the "gorgon" field of each streamed chunk), adapters, and a live metrics strip.
// Plain JS, no framework, no build step. Every URL is relative to the page's (no leading slash), so that the page
// also works behind a reverse proxy that serves it under a path prefix.

const $ = (id) => document.getElementById(id);
const METRICS_INTERVAL_MS = 1000;
const METRICS_SAMPLES = 120;

// ---- talking to the server ------------------------------------------------------------------------------

class ServerError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code; // the API's error code, e.g. "model_not_found"
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A request to the API; a non-2xx answer throws a ServerError with the server's own message.
async function api(path, { body, signal } = {}) {
  const options = { headers: authHeaders(), signal };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (!response.ok) throw await serverError(response);
  return response;
}

async function serverError(response) {
  const text = await response.text();
  const error = apiError(text);
  if (!error) return new ServerError(`${response.status}: ${text || response.statusText}`);
  const code = error.code ? ` (${error.code})` : "";
  return new ServerError(`${response.status} ${error.type}${code}: ${error.message}`, error.code);
}

// The API's error object in a body, if it is one (a proxy in between may answer with anything).
function apiError(text) {
  try {
    return JSON.parse(text).error;
  } catch {
    return undefined;
  }
}

// Server-sent events of a streamed answer: each `data:` payload parsed, up to `[DONE]`.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---- models and adapters ------------------------------------------------------------------------------

async function refreshModels() {
  try {
    const { data } = await (await api("v1/models")).json();
    fillModelPicker($("model"), data);
    fillModelPicker($("model-b"), data);
    fillAdapterList(data.filter((card) => card.parent));
    showSpeculation(data.some((card) => card.speculative));
    syncPanes();
    showError("");
  } catch (e) {
    showError(`Could not list models: ${e.message}`);
  }
}

function fillModelPicker(select, cards) {
  const chosen = select.value;
  select.replaceChildren(...cards.map((card) => new Option(card.parent ? `${card.id} (adapter)` : card.id, card.id)));
  if (cards.some((card) => card.id === chosen)) select.value = chosen;
}

// Medusa's controls only where the server speculates (its model cards say so): elsewhere each step adds one token.
function showSpeculation(speculates) {
  const checkbox = $("use-medusa");
  if (checkbox.disabled === speculates) checkbox.checked = speculates; // when it changes: on wherever it can be
  checkbox.disabled = !speculates;
  $("medusa-label").textContent = speculates ? "Medusa" : "Medusa (this server does not speculate)";
  $("compare").querySelector('option[value="medusa"]').disabled = !speculates;
  if (!speculates && $("compare").value === "medusa") $("compare").value = "off";
}

function fillAdapterList(adapters) {
  const items = adapters.map((card) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = card.id;
    name.title = card.root;
    const unload = document.createElement("button");
    unload.type = "button";
    unload.textContent = "Unload";
    unload.addEventListener("click", () => changeAdapter("v1/unload_lora_adapter", { lora_name: card.id }));
    item.append(name, unload);
    return item;
  });
  if (!items.length) items.push(Object.assign(document.createElement("li"), { textContent: "none loaded" }));
  $("adapter-list").replaceChildren(...items);
}

async function changeAdapter(path, body) {
  const message = $("adapter-message");
  message.dataset.state = "busy";
  message.textContent = "…";
  try {
    message.textContent = await (await api(path, { body })).text();
    message.dataset.state = "ok";
  } catch (e) {
    message.textContent = e.message;
    message.dataset.state = "error";
  }
  await refreshModels();
}

// ---- panes: one answer each, token by token -----------------------------------------------------------

class Pane {
  constructor(title) {
    this.el = $("pane-template").content.firstElementChild.cloneNode(true);
    this.el.querySelector(".pane-title").textContent = title;
    this.transcript = this.el.querySelector(".transcript");
    this.histogram = this.el.querySelector(".histogram");
    this.messages = []; // chat history of this pane
    this.controller = null;
    this.resetStats();
  }

  resetStats() {
    this.stepCounts = []; // stepCounts[n]: steps that added n tokens
    this.tokens = this.firstStepTokens = 0;
    this.start = this.first = this.last = null;
    this.serverRate = null; // tokens/s as the server timed the answer (its last chunk's timings)
    this.showStats();
  }

  set state(value) {
    this.el.dataset.state = value;
  }

  addBlock(className, text = "") {
    const block = document.createElement("div");
    block.className = `block ${className}`;
    block.textContent = text;
    this.transcript.append(block);
    this.transcript.scrollTop = this.transcript.scrollHeight;
    return block;
  }

  // One streamed chunk's `text`, added to `target`: made by a step of `step_tokens` tokens whose texts are `tokens`
  // (when the server sent them; the answer's last chunk also brings its `timings`).
  addStep(target, text, { step_tokens: n, tokens, timings }) {
    const now = performance.now();
    if (n > 0) {
      if (this.first === null) [this.first, this.firstStepTokens] = [now, n];
      this.last = now;
      this.tokens += n;
      this.stepCounts[n] = (this.stepCounts[n] || 0) + 1;
    }
    if (timings) this.serverRate = timings.predicted_per_second;
    if (text) target.append(stepElement(text, n, tokens, this.stepCount()));
    this.transcript.scrollTop = this.transcript.scrollHeight;
    this.showStats();
  }

  stepCount() {
    return this.stepCounts.reduce((sum, count) => sum + (count || 0), 0);
  }

  showStats() {
    const stat = (name, value) => (this.el.querySelector(`[data-stat="${name}"]`).textContent = value);
    // decode speed: the server's once the answer ends; until then the tokens after the first step over the time
    // since it arrived (rough: the chunks come in bursts, several to a read)
    const decodeSeconds = (this.last - this.first) / 1000;
    const decoded = this.tokens - this.firstStepTokens;
    const rate = this.serverRate ?? (decoded > 0 && decodeSeconds > 0 ? decoded / decodeSeconds : null);
    stat("tps", rate !== null ? rate.toFixed(1) : "–");
    stat("ttft", this.first !== null ? `${Math.round(this.first - this.start)} ms` : "–");
    const steps = this.stepCount();
    stat("steps", steps ? `${this.tokens} / ${steps} (${(this.tokens / steps).toFixed(2)} per step)` : "–");
    drawHistogram(this.histogram, this.stepCounts);
  }
}

// A step's text as one span; its tokens as spans of their own when their texts add up to the step's text
// (text held back for a stop string, or a character split across tokens, shows as the step's text alone).
function stepElement(text, n, tokens, index) {
  const step = document.createElement("span");
  step.className = n > 1 ? "step multi" : "step";
  step.dataset.tokens = n;
  step.title = n > 1 ? `step ${index}: ${n - 1} accepted draft token(s) + 1 from the verify step`
    : `step ${index}: ${n} token(s)`;
  if (n > 0 && tokens && tokens.length === n && tokens.join("") === text) {
    tokens.forEach((token, i) => step.append(tokenElement(token, n === 1 ? "single" : i < n - 1 ? "draft" : "verify")));
  } else {
    step.append(tokenElement(text, n > 1 ? "draft" : "single"));
  }
  return step;
}

function tokenElement(text, kind) {
  const token = document.createElement("span");
  token.className = text.includes("\n") ? `tok ${kind} newline` : `tok ${kind}`;
  token.textContent = text;
  return token;
}

function drawHistogram(canvas, counts) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const styles = getComputedStyle(document.documentElement);
  ctx.clearRect(0, 0, width, height);
  const sizes = Math.max(5, counts.length - 1);
  const top = Math.max(1, ...counts.filter(Boolean));
  const slot = width / sizes;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "center";
  for (let n = 1; n <= sizes; n++) {
    const count = counts[n] || 0;
    const barHeight = ((height - 30) * count) / top;
    const x = (n - 1) * slot;
    ctx.fillStyle = styles.getPropertyValue(n > 1 ? "--draft" : "--single-bar");
    ctx.fillRect(x + 4, height - 16 - barHeight, slot - 8, barHeight);
    ctx.fillStyle = styles.getPropertyValue("--fg");
    ctx.fillText(String(n), x + slot / 2, height - 3);
    if (count) ctx.fillText(String(count), x + slot / 2, height - 19 - barHeight);
  }
}

// ---- sending ---------------------------------------------------------------------------------------------

let panes = [];

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

// What each pane asks for: its title and the fields that differ between panes.
function paneSetups() {
  const model = $("model").value;
  const medusa = $("use-medusa").checked;
  const medusaLabel = (on) => `Medusa ${on ? "on" : "off"}`;
  const name = (id) => id || "(no model listed)";
  switch ($("compare").value) {
    case "medusa":
      return [{ title: `${name(model)} · ${medusaLabel(true)}`, model, use_medusa: true },
        { title: `${name(model)} · ${medusaLabel(false)}`, model, use_medusa: false }];
    case "model": {
      const other = $("model-b").value;
      return [{ title: `${name(model)} · ${medusaLabel(medusa)}`, model, use_medusa: medusa },
        { title: `${name(other)} · ${medusaLabel(medusa)}`, model: other, use_medusa: medusa }];
    }
    default:
      return [{ title: `${name(model)} · ${medusaLabel(medusa)}`, model, use_medusa: medusa }];
  }
}

function resetPanes() {
  stop();
  panes = paneSetups().map((setup) => Object.assign(new Pane(setup.title), { setup }));
  $("panes").replaceChildren(...panes.map((pane) => pane.el));
  $("panes").classList.toggle("two", panes.length > 1);
}

// New panes when the pickers changed what they would show, unless a request is running.
function syncPanes() {
  const titles = paneSetups().map((setup) => setup.title).join("|");
  const running = panes.some((pane) => pane.controller);
  if (!running && titles !== panes.map((pane) => pane.setup.title).join("|")) resetPanes();
}

// The number fields filled in (one left empty is left out: the model's recommended value applies, where it has one).
const NUMBER_FIELDS = { temperature: "temperature", top_p: "top-p", top_k: "top-k", max_tokens: "max-tokens",
  seed: "seed" };

function samplingFields() {
  const fields = { ignore_eos: $("ignore-eos").checked, stream: true };
  for (const [name, id] of Object.entries(NUMBER_FIELDS)) {
    const value = $(id).value.trim();
    if (value !== "") fields[name] = Number(value);
  }
  return fields;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || panes.some((pane) => pane.controller)) return;
  syncPanes();
  $("prompt").value = "";
  showError("");
  setRunning(true);
  await Promise.all(panes.map((pane) => runPane(pane, text, samplingFields())));
  setRunning(false);
  const failed = panes.some((pane) => pane.el.dataset.state === "error");
  if (failed && !$("prompt").value) $("prompt").value = text; // to send again (unless another was typed meanwhile)
}

async function runPane(pane, text, fields) {
  const chat = mode() === "chat";
  const { model, use_medusa } = pane.setup;
  let path, body, question;
  if (chat) {
    pane.messages.push({ role: "user", content: text });
    question = pane.addBlock("user", text);
    path = "v1/chat/completions";
    body = { ...fields, model, use_medusa, messages: pane.messages };
  } else {
    pane.messages = [];
    pane.transcript.replaceChildren();
    path = "v1/completions";
    body = { ...fields, model, use_medusa, prompt: text };
  }
  const block = pane.addBlock(chat ? "assistant" : "completion");
  if (!chat) block.append(tokenElement(text, "prompt"));
  pane.resetStats();
  pane.start = performance.now();
  pane.controller = new AbortController();
  pane.state = "streaming";
  let answer = "";
  try {
    const response = await api(path, { body, signal: pane.controller.signal });
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ServerError(`${chunk.error.type}: ${chunk.error.message}`, chunk.error.code);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const delta = chat ? choice.delta : { content: choice.text };
      const step = chunk.gorgon || { step_tokens: delta.content || delta.reasoning_content ? 1 : 0 };
      answer += delta.content || "";
      showDelta(pane, block, delta, step);
      if (choice.finish_reason) block.dataset.finishReason = choice.finish_reason;
    }
    pane.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      pane.state = "stopped";
      block.dataset.finishReason = "stopped";
    } else {
      const message = await failureMessage(e); // (before the pane says it failed: its message is then shown)
      pane.state = "error";
      pane.addBlock("failure", message);
      showError(message);
    }
  } finally {
    pane.controller = null;
    if (chat && pane.el.dataset.state === "error") { // the question goes unanswered: drop it (send restores it)
      pane.messages.pop();
      question.remove();
    } else if (chat) {
      pane.messages.push({ role: "assistant", content: answer });
    }
  }
}

// A chunk's text: its reasoning (a server with --reasoning-parser streams it apart) in a box of its own above the
// answer, for it is not the answer and does not go back in the chat's history; its content in the answer's block.
function showDelta(pane, block, delta, step) {
  const reasoning = delta.reasoning_content || "";
  const content = delta.content || "";
  if (reasoning) pane.addStep(reasoningBox(block), reasoning, step);
  if (content || !reasoning) pane.addStep(block, content, reasoning ? { step_tokens: 0 } : step); // (counted once)
}

function reasoningBox(block) {
  if (block.previousElementSibling?.classList.contains("reasoning")) return block.previousElementSibling;
  const box = document.createElement("details");
  box.className = "block reasoning";
  box.open = true;
  box.append(Object.assign(document.createElement("summary"), { textContent: "reasoning" }));
  block.before(box);
  return box;
}

// What a failed request says. A model the server no longer serves (an adapter unloaded elsewhere): the list is stale.
async function failureMessage(error) {
  if (error.code !== "model_not_found") return error.message;
  await refreshModels();
  return `${error.message}. The model list is refreshed: pick another.`;
}

// Aborting the fetch closes the connection; the server then aborts the request and frees its KV blocks.
function stop() {
  for (const pane of panes) pane.controller?.abort();
}

function setRunning(running) {
  $("send").disabled = running;
  $("stop").disabled = !running;
}

// ---- the metrics strip -------------------------------------------------------------------------------------

const series = { running: [], waiting: [], kv: [], tps: [] };
let lastTokens = null; // the token counter at the last poll, and when (null: unknown)

// Prometheus text format -> {name: value}, summing a metric's labelled series.
function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (match) values[match[1]] = (values[match[1]] || 0) + Number(match[3]);
  }
  return values;
}

async function pollMetrics() {
  if (!document.hidden) await pollMetricsOnce();
  setTimeout(pollMetrics, METRICS_INTERVAL_MS);
}

async function pollMetricsOnce() {
  let response;
  try {
    response = await fetch("metrics");
  } catch {
    serverUnreachable();
    return;
  }
  serverReached();
  if (!response.ok) return; // the server is there, its metrics withheld (a proxy may block /metrics)
  const values = parseMetrics(await response.text());
  record("running", values.gorgon_requests_running ?? 0, String(values.gorgon_requests_running ?? 0));
  record("waiting", values.gorgon_requests_waiting ?? 0, String(values.gorgon_requests_waiting ?? 0));
  const kv = 100 * (values.gorgon_kv_cache_usage ?? 0);
  record("kv", kv, `${kv.toFixed(1)}%`);
  const rate = tokenRate(values.gorgon_generation_tokens_total ?? 0, performance.now());
  record("tps", rate, rate === null ? "–" : rate.toFixed(0));
}

// Tokens/s since the last poll; null (unknown) after a failed poll, or where the counter went down (a restarted
// server counts from 0 again).
function tokenRate(tokens, now) {
  const last = lastTokens;
  lastTokens = { tokens, time: now };
  return last && tokens >= last.tokens ? (tokens - last.tokens) / ((now - last.time) / 1000) : null;
}

function serverUnreachable() {
  $("server-status").hidden = false;
  lastTokens = null;
  record("tps", null, "–");
}

function serverReached() {
  if ($("server-status").hidden) return;
  $("server-status").hidden = true;
  refreshModels(); // it may be back with other models or adapters
}

// The latest value of a metric, plotted (null: unknown, not plotted) and shown as `label`.
function record(name, value, label) {
  const values = series[name];
  if (value !== null) values.push(value);
  if (values.length > METRICS_SAMPLES) values.shift();
  document.querySelector(`[data-value="${name}"]`).textContent = label;
  drawSparkline(document.querySelector(`canvas[data-metric="${name}"]`), values, name === "kv" ? 100 : 0);
}

function drawSparkline(canvas, values, fixedTop) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const top = fixedTop || Math.max(1, ...values);
  const x = (i) => width - (values.length - 1 - i) * (width / (METRICS_SAMPLES - 1));
  const y = (v) => height - 2 - ((height - 4) * v) / top;
  ctx.beginPath();
  values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent");
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

// ---- wiring ------------------------------------------------------------------------------------------------

function init() {
  const key = sessionStorage.getItem("gorgon-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("gorgon-api-key", $("api-key").value.trim());
    refreshModels();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape") {
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", resetPanes);
  $("compare").addEventListener("change", () => {
    $("model-b-row").hidden = $("compare").value !== "model";
    resetPanes();
  });
  for (const id of ["model", "model-b", "use-medusa"]) $(id).addEventListener("change", resetPanes);
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", resetPanes);
  $("load-adapter").addEventListener("submit", (event) => {
    event.preventDefault();
    changeAdapter("v1/load_lora_adapter", { lora_name: $("adapter-name").value.trim(),
      lora_path: $("adapter-path").value.trim() });
  });
  refreshModels().then(syncPanes);
  pollMetrics();
}

init();
