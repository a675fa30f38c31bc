// The page talks to the same OpenAI-compatible API as any other client: /v1/models and a
// streamed /v1/completions (or, in chat mode, /v1/chat/completions), read as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const sliders = ["temperature", "top_p", "top_k", "max_tokens"];
const output = $("output");
let models = [];
let running = null; // the AbortController of the generation under way
let mode = "write"; // or "chat", for models with a chat template
let chat = []; // the conversation so far: {role, content}

function say(message, error = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", error);
}

function headers() {
  const key = $("key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (response.status === 401) throw new Error("this server needs its API key: type it in the API key box");
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error?.message || `${response.status} ${response.statusText}`);
  }
  return response;
}

async function start() {
  for (const id of sliders) {
    const show = () => (document.querySelector(`output[for=${id}]`).textContent = $(id).value);
    $(id).addEventListener("input", show);
    show();
  }
  const health = await (await fetch("/health")).json();
  $("max_tokens").max = health.limits.max_tokens_cap;
  $("max_tokens").dispatchEvent(new Event("input"));
  $("key-box").hidden = !health.auth;
  $("key").addEventListener("change", loadModels);
  $("model").addEventListener("change", showLabels);
  $("generate").addEventListener("click", () => (mode === "chat" ? send() : generate()));
  $("stop").addEventListener("click", () => running?.abort());
  $("copy").addEventListener("click", () => copy(mode === "chat" ? transcriptText() : output.textContent, $("copy")));
  $("mode-write").addEventListener("click", () => setMode("write"));
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("new-chat").addEventListener("click", newChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate").click();
  });
  await loadModels();
}

async function loadModels() {
  try {
    models = (await (await api("/v1/models")).json()).data;
  } catch (e) {
    return say(e.message, true);
  }
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  showLabels();
  say(`${models.length} model${models.length === 1 ? "" : "s"} ready`);
}

function showLabels() {
  const model = models.find((m) => m.id === $("model").value);
  const labels = model ? model.labels : [];
  $("label").replaceChildren(new Option("any", ""), ...labels.map((l) => new Option(l, l)));
  $("label").disabled = labels.length === 0 || mode === "chat";
  $("modes").hidden = !model?.chat;
  if (!model?.chat) setMode("write");
}

function setMode(next) {
  mode = next;
  const chatting = mode === "chat";
  $("mode-write").setAttribute("aria-pressed", String(!chatting));
  $("mode-chat").setAttribute("aria-pressed", String(chatting));
  $("chat-box").hidden = !chatting;
  $("new-chat").hidden = !chatting;
  output.hidden = chatting;
  $("history-box").hidden = chatting || !$("history").children.length;
  $("generate").textContent = chatting ? "Send" : "Generate";
  $("prompt").placeholder = chatting ? "Write a message, then press Send…" : "Begin your text here, then press Generate…";
  $("label").disabled = chatting || $("label").options.length <= 1;
}

function request(prompt) {
  const body = { model: $("model").value, prompt, stream: true };
  for (const id of sliders) body[id] = Number($(id).value);
  if ($("label").value) body.label = $("label").value;
  return body;
}

// Chat mode: the whole conversation goes with each message; the reply streams into the transcript.
async function send() {
  const text = $("prompt").value.trim();
  if (running || !text) return;
  $("prompt").value = "";
  chat.push({ role: "user", content: text });
  addTurn("user", text);
  const reply = addTurn("assistant", "");
  const { prompt, label, ...body } = request(null);
  const system = $("system").value.trim();
  body.messages = [...(system ? [{ role: "system", content: system }] : []), ...chat];
  reply.classList.add("writing");
  await streamText("/v1/chat/completions", body, (c) => (reply.textContent += c.delta?.content ?? ""));
  reply.classList.remove("writing");
  if (reply.textContent) chat.push({ role: "assistant", content: reply.textContent });
}

function addTurn(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("transcript").append(item);
  return item;
}

function newChat() {
  if (running) running.abort();
  chat = [];
  $("transcript").replaceChildren();
}

function transcriptText() {
  return chat.map((m) => `${m.role}: ${m.content}`).join("\n\n");
}

async function generate() {
  if (running) return;
  const prompt = $("prompt").value;
  const continuation = output.querySelector(".continuation");
  output.querySelector(".prompt").textContent = prompt;
  continuation.textContent = "";
  const settings = request(prompt);
  await streamText("/v1/completions", settings, (c) => (continuation.textContent += c.text ?? ""));
  remember(prompt, continuation.textContent, settings);
}

// POST `body` to `path` as a stream, handing each event's choice to `add`, and say how it ended.
async function streamText(path, body, add) {
  running = new AbortController();
  busy(true);
  say("writing…");
  try {
    const response = await api(path, { method: "POST", body: JSON.stringify(body), signal: running.signal });
    for await (const event of serverEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      add(event.choices[0] ?? {});
    }
    say("done");
  } catch (e) {
    say(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
  } finally {
    running = null;
    busy(false);
  }
}

// Yield each JSON event of a server-sent event stream until `data: [DONE]`.
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function busy(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  $("copy").disabled = on;
  output.classList.toggle("writing", on);
}

function remember(prompt, text, settings) {
  if (!text) return;
  const item = document.createElement("li");
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = settings.label ? ` · ${settings.label}` : "";
  meta.append(`${settings.model}${label} · temperature ${settings.temperature} · ${new Date().toLocaleTimeString()}`);
  const button = document.createElement("button");
  button.textContent = "Copy";
  button.addEventListener("click", () => copy(prompt + text, button));
  meta.append(button);
  const body = document.createElement("div");
  body.className = "text";
  const bold = document.createElement("span");
  bold.className = "prompt";
  bold.textContent = prompt;
  const added = document.createElement("span");
  added.className = "continuation";
  added.textContent = text;
  body.append(bold, added);
  item.append(meta, body);
  $("history").prepend(item);
  $("history-box").hidden = false;
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // The clipboard API needs a secure context; plain http on a LAN address is not one.
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const was = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = was), 1200);
}

start().catch((e) => say(e.message, true));
