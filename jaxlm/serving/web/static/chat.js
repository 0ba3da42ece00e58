// The chat page of `jaxlm serve`: streams replies from this server's /v1/chat/completions.
// Plain JavaScript with no dependencies, so the page works offline and needs no build step.
// Model output only ever reaches the page as text nodes (textContent), never as HTML.
"use strict";

const KEY_STORAGE = "jaxlm-api-key";

const $ = (id) => document.getElementById(id);

const state = {
  history: [],        // [{role, content}] of the conversation so far, without the system prompt
  controller: null,   // the AbortController of the reply being streamed, if any
  defaults: null,     // GET /chat/defaults
  lastRequest: null,  // the body of the last chat request sent (shown to tests and curious users)
};

// ------------------------------------------------------------------ rendering
// Splits text into fenced code blocks (```lang ... ```) and prose with `inline code`, and builds
// DOM nodes from them with textContent only: a reply holding "<script>" shows as those characters.
function renderText(container, text) {
  const nodes = [];
  const fence = /```[^\n`]*\n?([\s\S]*?)(?:```|$)/g;
  let at = 0;
  for (const match of text.matchAll(fence)) {
    if (match.index > at) nodes.push(prose(text.slice(at, match.index)));
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = match[1].replace(/\n$/, "");
    pre.appendChild(code);
    nodes.push(pre);
    at = match.index + match[0].length;
  }
  if (at < text.length) nodes.push(prose(text.slice(at)));
  container.replaceChildren(...nodes);
}

function prose(text) {
  const span = document.createElement("span");
  text.split(/(`[^`\n]+`)/).forEach((part, i) => {
    if (i % 2 === 1) {
      const code = document.createElement("code");
      code.textContent = part.slice(1, -1);
      span.appendChild(code);
    } else if (part) {
      span.appendChild(document.createTextNode(part));
    }
  });
  return span;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  if (role === "assistant") renderText(content, text); else content.textContent = text;
  div.appendChild(content);
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function setStats(div, text) {
  let stats = div.querySelector(".stats");
  if (!stats) {
    stats = document.createElement("div");
    stats.className = "stats";
    div.appendChild(stats);
  }
  stats.textContent = text;
}

function showError(text) {
  addMessage("error", text);
}

// ------------------------------------------------------------------- requests
function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function askForKey() {
  $("api-key-dialog").hidden = false;
  $("api-key-input").focus();
}

function numberSetting(id, name) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;   // left empty: the server's default
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${name}: not a number: ${raw}`);
  return value;
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value;
  if (system.trim()) messages.push({role: "system", content: system});
  const body = {
    messages: messages.concat(state.history),
    stream: true,
    stream_options: {include_usage: true},
    temperature: numberSetting("temperature", "temperature"),
    top_p: numberSetting("top-p", "top_p"),
    max_tokens: numberSetting("max-tokens", "max tokens"),
  };
  if (state.defaults && state.defaults.model) body.model = state.defaults.model;
  return body;
}

class ServerError extends Error {}

async function errorMessage(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) detail = body.error.message;
  } catch (e) {
    // not JSON (a proxy's page, say): the status line is all there is
  }
  return `Error ${response.status}: ${detail}`;
}

// Server-sent events read by hand: EventSource cannot POST a body, and this needs no library.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
  throw new Error("the stream ended before [DONE]");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  if (state.defaults && state.defaults.api_key_required && !apiKey()) {
    askForKey();
    return;
  }
  // this turn's conversation: New chat replaces state.history, so a reply stopped by it lands here
  const history = state.history;
  let body;
  history.push({role: "user", content: text});
  try {
    body = requestBody();
  } catch (e) {
    history.pop();
    showError(e.message);
    return;
  }
  $("input").value = "";
  const question = addMessage("user", text);
  const controller = new AbortController();
  state.controller = controller;
  state.lastRequest = body;
  setBusy(true);
  const reply = addMessage("assistant", "");
  const content = reply.querySelector(".content");
  let answer = "", usage = null, firstAt = null, lastAt = null;
  const sentAt = performance.now();
  try {
    const headers = {"Content-Type": "application/json"};
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) {
      if (response.status === 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        askForKey();
      }
      throw new ServerError(await errorMessage(response));
    }
    for await (const event of sseEvents(response)) {
      if (event.error) throw new ServerError(`Error: ${event.error.message}`);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (!delta) continue;
        lastAt = performance.now();
        if (firstAt === null) firstAt = lastAt;
        answer += delta;
        renderText(content, answer);
        reply.scrollIntoView({block: "end"});
      }
    }
    history.push({role: "assistant", content: answer});
    setStats(reply, replyStats(usage, sentAt, firstAt, lastAt));
  } catch (e) {
    if (e.name === "AbortError" && answer) {
      // Stopped: the reply so far stays in the conversation, as model.chat would have returned it.
      history.push({role: "assistant", content: answer});
      setStats(reply, "stopped");
    } else if (e.name === "AbortError") {
      // stopped before any text: the turn is withdrawn, its text back in the box (unless New chat cleared it)
      history.pop();
      question.remove();
      reply.remove();
      if (history === state.history && !$("input").value) $("input").value = text;
    } else {
      if (answer) {
        history.push({role: "assistant", content: answer});
        setStats(reply, "incomplete");
      } else {
        // the failed turn leaves the conversation (shown and sent): its text is back in the box to resend
        question.remove();
        reply.remove();
        history.pop();
        if (!$("input").value) $("input").value = text;
      }
      showError(e instanceof ServerError ? e.message : `Connection lost: ${e.message}`);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function replyStats(usage, sentAt, firstAt, lastAt) {
  const tokens = usage ? usage.completion_tokens : null;
  const parts = [];
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (tokens !== null && firstAt !== null && lastAt > firstAt && tokens > 1) {
    // decode speed: the tokens after the first over the time they took
    parts.push(`${((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(1)} tokens/s`);
  }
  if (firstAt !== null) parts.push(`first token after ${((firstAt - sentAt) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
  $("input").focus();
}

// ---------------------------------------------------------------------- setup
async function loadDefaults() {
  const response = await fetch("/chat/defaults");
  if (!response.ok) throw new ServerError(await errorMessage(response));
  const d = await response.json();
  state.defaults = d;
  $("model-name").textContent = d.model;
  $("system-prompt").value = d.system_prompt;
  $("temperature").value = d.temperature;
  $("top-p").value = d.top_p;
  $("max-tokens").value = d.max_tokens;
  $("limits").textContent = `max_model_len ${d.max_model_len}: the prompt plus max tokens must fit.`;
  if (d.api_key_required && !apiKey()) askForKey();
}

function setup() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("api-key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key-input").value = "";
    $("api-key-dialog").hidden = true;
    $("input").focus();
  });
  loadDefaults().catch((e) => showError(`Cannot load the page's settings: ${e.message}`));
}

window.jaxlmChat = {renderText, state};
setup();
