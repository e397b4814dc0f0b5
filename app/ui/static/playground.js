// The playground: chat and completions streamed from the OpenAI routes, the tokenizer
// view from /tokenize, and the current request as curl and Python. Public API only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null, // the served model's id, from v1/models
  messages: [], // the conversation: {role, content}
  controller: null, // AbortController of the request in flight
};

// ---------------------------------------------------------------- the request body

function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function jsonOf(id, name) {
  const text = $(id).value.trim();
  if (text === "") return null;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(name + " is not valid JSON: " + err.message);
  }
}

// The sampling fields shared by chat and completions, from the parameter form.
function samplingFields() {
  const body = {};
  const fields = { temperature: "temperature", top_p: "top_p", top_k: "top_k",
    max_tokens: "max_tokens", seed: "seed" };
  for (const [field, id] of Object.entries(fields)) {
    const value = numberOf(id);
    if (value !== null && !Number.isNaN(value)) body[field] = value;
  }
  const stops = $("stop-strings").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stops.length) body.stop = stops;
  return body;
}

function chatBody(messages) {
  const system = $("system-prompt").value.trim();
  const all = system ? [{ role: "system", content: system }, ...messages] : messages;
  const body = Object.assign({ model: state.model, messages: all }, samplingFields());
  const schema = jsonOf("response-format", "response_format");
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
  const tools = jsonOf("tools", "tools");
  if (tools) {
    body.tools = tools;
    body.tool_choice = $("tool-choice").value;
  }
  if ($("logprobs").checked) body.logprobs = true;
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

function completionBody() {
  const body = Object.assign({ model: state.model, prompt: $("raw-prompt").value },
    samplingFields());
  if ($("logprobs").checked) body.logprobs = 0;
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

function currentRequest() {
  if (!$("panel-completion").hidden) return { path: "v1/completions", body: completionBody() };
  const pending = $("user-input").value.trim();
  const messages = pending ? [...state.messages, { role: "user", content: pending }]
    : state.messages.length ? state.messages : [{ role: "user", content: "Hello!" }];
  return { path: "v1/chat/completions", body: chatBody(messages) };
}

// ---------------------------------------------------------------- code views

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function pythonLiteral(value, indent = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "string" || typeof value === "number") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map((v) => inner + pythonLiteral(v, inner)).join(",\n") + ",\n" + indent + "]";
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return "{\n" + entries.map(([k, v]) => inner + JSON.stringify(k) + ": " + pythonLiteral(v, inner))
    .join(",\n") + ",\n" + indent + "}";
}

// Fields the openai client has no argument for go in extra_body.
const OPENAI_ARGUMENTS = new Set(["model", "messages", "prompt", "temperature", "top_p",
  "max_tokens", "seed", "stop", "response_format", "tools", "tool_choice", "logprobs", "stream",
  "stream_options"]);

function renderCode() {
  let request;
  try {
    request = currentRequest();
  } catch (err) {
    $("code-curl").textContent = $("code-python").textContent = err.message;
    return;
  }
  const base = new URL(".", window.location.href).href; // shown to copy, never fetched
  const keyHeader = storedKey() ? '  -H "Authorization: Bearer $LAMINA_API_KEY" \\\n' : "";
  $("code-curl").textContent = "curl -N " + base + request.path + " \\\n" +
    '  -H "Content-Type: application/json" \\\n' + keyHeader +
    "  -d " + shellQuote(JSON.stringify(request.body));
  const args = [];
  const extra = {};
  for (const [field, value] of Object.entries(request.body)) {
    if (OPENAI_ARGUMENTS.has(field)) args.push("    " + field + "=" + pythonLiteral(value, "    ") + ",");
    else extra[field] = value;
  }
  if (Object.keys(extra).length) args.push("    extra_body=" + pythonLiteral(extra, "    ") + ",");
  const chat = request.path.includes("chat");
  $("code-python").textContent = [
    "import os",
    "from openai import OpenAI",
    "",
    'client = OpenAI(base_url="' + base + 'v1", api_key=os.environ.get("LAMINA_API_KEY", "none"))',
    "stream = client." + (chat ? "chat.completions" : "completions") + ".create(",
    ...args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    chat ? '        print(chunk.choices[0].delta.content or "", end="", flush=True)'
      : '        print(chunk.choices[0].text, end="", flush=True)',
  ].join("\n");
}

// ---------------------------------------------------------------- streaming

// Read server-sent events from `response`, calling onEvent(object) per `data:` line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue; // comments are keep-alives
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

// One streamed answer: appends tokens to `target`, returns the stats shown under it.
async function streamAnswer(path, body, target, textOf) {
  setBusy(true);
  state.controller = new AbortController();
  const started = performance.now();
  const stats = { tokens: 0, first: null, last: null, finish: null, cached: null, text: "" };
  try {
    const response = await apiFetch(path, { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" }, signal: state.controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message || "the server ended the stream");
      if (event.usage) {
        stats.tokens = event.usage.completion_tokens;
        const details = event.usage.prompt_tokens_details;
        stats.cached = details ? details.cached_tokens : 0;
      }
      for (const choice of event.choices || []) {
        const piece = textOf(choice);
        const calls = choice.delta && choice.delta.tool_calls;
        if (piece || calls) { // a token arrived: text or a piece of a tool call
          const now = performance.now();
          if (stats.first === null) stats.first = now;
          stats.last = now;
        }
        if (piece) {
          stats.text += piece;
          appendToken(target, piece, choice.logprobs);
        }
        if (calls) appendToolCalls(target, calls);
        if (choice.finish_reason) stats.finish = choice.finish_reason;
      }
    });
  } catch (err) {
    if (err.name === "AbortError") stats.finish = "stopped";
    else {
      stats.failed = true;
      showError(err.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  showStats(target, stats, started);
  return stats;
}

function tokenTitle(logprobs) {
  if (!logprobs) return null;
  const items = logprobs.content // chat
    ? logprobs.content.map((t) => [t.token, t.logprob])
    : (logprobs.tokens || []).map((t, i) => [t, logprobs.token_logprobs[i]]); // completions
  return items.map(([token, lp]) => JSON.stringify(token) + ": logprob " + lp.toFixed(3) +
    " (p " + Math.exp(lp).toFixed(3) + ")").join("\n");
}

function appendToken(target, piece, logprobs) {
  const span = element("span", { class: "tok" }, piece);
  const title = tokenTitle(logprobs);
  if (title) {
    span.title = title;
    span.classList.add("has-logprob");
  }
  target.querySelector(".content").appendChild(span);
}

// Tool calls stream as pieces of a name and of JSON arguments, per call index.
function appendToolCalls(target, calls) {
  target.toolCalls = target.toolCalls || [];
  for (const call of calls) {
    const index = call.index || 0;
    const slot = target.toolCalls[index] || (target.toolCalls[index] = { name: "", args: "" });
    if (call.id) slot.id = call.id;
    if (call.function && call.function.name) slot.name += call.function.name;
    if (call.function && call.function.arguments) slot.args += call.function.arguments;
  }
  let block = target.querySelector(".tool-calls");
  if (!block) {
    block = element("pre", { class: "tool-calls", "aria-label": "Tool calls" });
    target.appendChild(block);
  }
  block.textContent = target.toolCalls.filter(Boolean)
    .map((call) => call.name + "(" + call.args + ")").join("\n");
}

// Times are performance.now() milliseconds: sent at `started`, first and last token.
function showStats(target, stats, started) {
  const parts = [stats.tokens + " tokens"];
  if (stats.first !== null) parts.push("TTFT " + Math.round(stats.first - started) + " ms");
  if (stats.tokens > 1 && stats.last > stats.first) {
    const seconds = (stats.last - stats.first) / 1000; // the tokens after the first
    parts.push(((stats.tokens - 1) / seconds).toFixed(1) + " tok/s");
  }
  parts.push("finish: " + (stats.finish || "none"));
  if (stats.cached !== null) parts.push("cached prompt tokens: " + stats.cached);
  target.appendChild(element("p", { class: "stats" }, parts.join(" · ")));
}

// ---------------------------------------------------------------- chat

function messageNode(role, text) {
  const node = element("div", { class: "message " + role });
  node.appendChild(element("span", { class: "role" }, role));
  const content = element("div", { class: "content" });
  content.textContent = text;
  node.appendChild(content);
  $("messages").appendChild(node);
  return node;
}

async function sendChat() {
  const messages = state.messages.slice();
  const text = $("user-input").value.trim();
  if (text) messages.push({ role: "user", content: text });
  if (!messages.length || messages[messages.length - 1].role !== "user") return;
  let body;
  try {
    body = chatBody(messages);
  } catch (err) {
    showError(err.message);
    return;
  }
  showError("");
  if (text) {
    messageNode("user", text);
    $("user-input").value = "";
  }
  state.messages = messages;
  const target = messageNode("assistant", "");
  const stats = await streamAnswer("v1/chat/completions", body, target,
    (choice) => (choice.delta && choice.delta.content) || "");
  if (stats.failed && !stats.text) {
    target.remove(); // the user's turn stays: Send with an empty box asks again
    return;
  }
  state.messages.push(assistantTurn(stats.text, target.toolCalls));
  setBusy(false); // regenerate can now redo this answer
  renderCode();
}

// The answer as the conversation's next assistant message, its tool calls included, so
// that a follow-up question sends the conversation as it happened.
function assistantTurn(text, toolCalls) {
  const turn = { role: "assistant", content: text };
  const calls = (toolCalls || []).filter(Boolean);
  if (calls.length) {
    turn.tool_calls = calls.map((call, i) => ({ id: call.id || "call_" + i, type: "function",
      function: { name: call.name, arguments: call.args } }));
  }
  return turn;
}

function regenerate() {
  const last = state.messages[state.messages.length - 1];
  if (!last || last.role !== "assistant") return;
  state.messages.pop();
  const nodes = $("messages").querySelectorAll(".message.assistant");
  nodes[nodes.length - 1].remove();
  sendChat();
}

function clearChat() {
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
  renderCode();
}

// ---------------------------------------------------------------- completions

async function sendCompletion() {
  let body;
  try {
    body = completionBody();
  } catch (err) {
    showError(err.message);
    return;
  }
  showError("");
  const target = $("completion-output");
  target.replaceChildren(element("div", { class: "content" }));
  await streamAnswer("v1/completions", body, target, (choice) => choice.text || "");
}

// ---------------------------------------------------------------- tokenizer

const MAX_TOKENS_SHOWN = 512;

async function tokenize() {
  const text = $("tokenize-text").value;
  const request = $("tokenize-as-chat").checked
    ? { messages: [{ role: "user", content: text }] } : { prompt: text };
  showError("");
  const response = await apiFetch("tokenize", { method: "POST",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(request) });
  if (!response.ok) return showError(await errorText(response));
  const { tokens, count, max_model_len: limit } = await response.json();
  const shown = tokens.slice(0, MAX_TOKENS_SHOWN); // one /detokenize call per chip
  $("token-count").textContent = count + " tokens (context window " + limit + ")" +
    (shown.length < count ? "; the first " + shown.length + " shown" : "");
  const pieces = await Promise.all(shown.map(async (id) => {
    const piece = await apiFetch("detokenize", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ tokens: [id] }) });
    return piece.ok ? (await piece.json()).prompt : "?";
  }));
  $("tokens").replaceChildren(...pieces.map((piece, i) =>
    element("span", { class: "token", title: "id " + shown[i] }, piece.replace(/\n/g, "⏎"))));
}

// ---------------------------------------------------------------- page

function showError(message) {
  $("error").textContent = message;
}

function setBusy(busy) {
  $("send").disabled = $("complete").disabled = busy;
  $("stop").disabled = $("stop-completion").disabled = !busy;
  const last = state.messages[state.messages.length - 1];
  $("regenerate").disabled = busy || !last || last.role !== "assistant";
}

function stop() {
  if (state.controller) state.controller.abort();
}

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  renderCode();
}

async function loadModel() {
  const response = await apiFetch("v1/models");
  if (!response.ok) {
    $("model-name").textContent = "model: unavailable (" + (await errorText(response)) + ")";
    return;
  }
  state.model = (await response.json()).data[0].id;
  $("model-name").textContent = "model: " + state.model;
  renderCode();
}

function wire() {
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat();
  });
  $("user-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
  });
  $("completion-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendCompletion();
  });
  $("tokenize-form").addEventListener("submit", (event) => {
    event.preventDefault();
    tokenize();
  });
  $("stop").addEventListener("click", stop);
  $("stop-completion").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearChat);
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
  }
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const text = $(button.dataset.target).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (_) {
        button.textContent = "Select and copy";
      }
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
  }
  for (const id of ["params", "system-prompt", "user-input", "raw-prompt"]) {
    $(id).addEventListener("input", renderCode);
  }
}

wire();
renderCode();
loadModel();
