// famtune's chat page: plain JavaScript against the server's own OpenAI-compatible API.
// Each pane keeps its own history (the two models of side-by-side mode answer differently).
"use strict";

const $ = (id) => document.getElementById(id);
const panes = [
  { el: $("pane-a"), select: $("model-a"), history: [] },
  { el: $("pane-b"), select: $("model-b"), history: [] },
];
const SAVED = ["temperature", "max-tokens", "system", "api-key"];
let controllers = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

function activePanes() { return $("side-by-side").checked ? panes : panes.slice(0, 1); }

function layout() {
  const two = $("side-by-side").checked;
  $("pane-b").hidden = !two;
  $("model-b").disabled = !two;
  $("panes").classList.toggle("two", two);
  for (const p of panes) p.el.querySelector(".pane-title").textContent = p.select.value;
}

async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    status("cannot reach the server: " + e);
    return;
  }
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({}));
    status((err.error && err.error.message) || "error " + resp.status);
    if (resp.status === 401) document.getElementById("settings").open = true;
    return;
  }
  const models = (await resp.json()).data;
  const query = new URLSearchParams(location.search);
  for (const [i, p] of panes.entries()) {
    p.select.replaceChildren(...models.map((m) => {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.famtune ? `${m.id} (${m.famtune.kind}, ${m.famtune.family})` : m.id;
      return o;
    }));
    // Default: the first adapter beside the base, so side by side compares them.
    const adapters = models.filter((m) => m.famtune && m.famtune.kind === "adapter");
    const wanted = query.get(i === 0 ? "a" : "b") ||
      (i === 0 ? (adapters[0] || models[0]).id : (models.find((m) => m.id !== panes[0].select.value) || models[0]).id);
    if (models.some((m) => m.id === wanted)) p.select.value = wanted;
  }
  if (query.get("b")) $("side-by-side").checked = true;
  layout();
  status(`${models.length} model${models.length === 1 ? "" : "s"} served`);
  $("prompt").focus();
}

function bubble(pane, role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  const log = pane.el.querySelector(".log");
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function meta(div, text) {
  const span = document.createElement("span");
  span.className = "meta";
  span.textContent = text;
  div.appendChild(span);
}

// One streamed reply into one pane; resolves when it is complete, stopped or failed.
async function reply(pane, controller) {
  const model = pane.select.value;
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(pane.history);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  const div = bubble(pane, "assistant", "");
  div.dataset.model = model;
  div.dataset.state = "streaming";
  const started = performance.now();
  let text = "", first = null, usage = null, failure = null;
  const content = document.createElement("span");
  content.className = "text";
  div.appendChild(content);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || "error " + resp.status);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
          if (piece) {
            if (first === null) first = performance.now();
            text += piece;
            content.textContent = text;
            div.dataset.pieces = String(Number(div.dataset.pieces || 0) + 1);
            const log = pane.el.querySelector(".log");
            log.scrollTop = log.scrollHeight;
          }
        }
      }
    }
  } catch (e) {
    failure = controller.signal.aborted ? "stopped" : String(e.message || e);
  }
  if (failure) {
    pane.history.pop(); // the turn is dropped, as in `famtune chat`
    div.dataset.state = failure === "stopped" ? "stopped" : "error";
    if (failure !== "stopped") div.classList.add("error");
    meta(div, failure === "stopped" ? "(stopped; this turn is not kept)" : failure);
    return;
  }
  pane.history.push({ role: "assistant", content: text });
  div.dataset.state = "done";
  const secs = (performance.now() - started) / 1000;
  const parts = [model];
  if (first !== null) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  if (usage) parts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / secs).toFixed(1)} tokens/s`);
  meta(div, parts.join(" · "));
}

async function send(event) {
  if (event) event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controllers.length) return;
  $("prompt").value = "";
  $("send").disabled = true;
  $("stop").disabled = false;
  const running = activePanes().map((pane) => {
    pane.history.push({ role: "user", content: text });
    bubble(pane, "user", text);
    const controller = new AbortController();
    controllers.push(controller);
    return reply(pane, controller);
  });
  await Promise.all(running);
  controllers = [];
  $("send").disabled = false;
  $("stop").disabled = true;
  $("prompt").focus();
}

function newChat() {
  for (const p of panes) {
    p.history = [];
    p.el.querySelector(".log").replaceChildren();
  }
  status("new conversation");
}

for (const id of SAVED) {
  const saved = localStorage.getItem("famtune." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("famtune." + id, $(id).value));
}
$("api-key").addEventListener("change", loadModels);
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
$("stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
$("new-chat").addEventListener("click", newChat);
$("side-by-side").addEventListener("change", layout);
for (const p of panes) p.select.addEventListener("change", layout);
loadModels();
