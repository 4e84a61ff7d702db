// The chat page: a multi-turn conversation over POST /v1/chat/completions with streamed (SSE) replies.
// Model output is only ever put into the page as text (textContent), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];        // the conversation sent with every turn: {role, content}
let controller = null;   // the AbortController of the reply being streamed

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function addMessage(role, text) {
  const msg = el("div", "msg " + role);
  msg.appendChild(el("div", "role", role));
  const body = el("div", "content", text || "");
  msg.appendChild(body);
  $("log").appendChild(msg);
  $("log").scrollTop = $("log").scrollHeight;
  return msg;
}

// One assistant reply being streamed: a collapsible thinking block, the content, tool calls.
function replyView() {
  const msg = addMessage("assistant", "");
  const content = msg.querySelector(".content");
  let think = null;
  return {
    msg,
    reasoning(text) {
      if (!think) {
        think = el("details", "think");
        think.open = true;
        think.appendChild(el("summary", null, "thinking"));
        think.appendChild(el("div", "think-text", ""));
        msg.insertBefore(think, content);
      }
      think.querySelector(".think-text").textContent += text;
    },
    content(text) { content.textContent += text; },
    toolCalls(calls) {
      for (const c of calls) {
        const f = c.function || {};
        msg.appendChild(el("div", "tool", "tool call: " + f.name + "(" + (f.arguments || "") + ")"));
      }
    },
    finish(reason) {
      if (think) think.open = false;  // the reasoning stays, collapsed
      msg.appendChild(el("div", "finish", reason));
      msg.dataset.finish = reason;
    },
    text() { return content.textContent; },
  };
}

function requestBody() {
  const body = {
    model: $("model").dataset.name || "minimind",
    messages: history,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    chat_template_kwargs: { open_thinking: $("thinking").checked },
  };
  return JSON.stringify(body);
}

// Reads Server-Sent Events from a fetch response, calling onEvent(parsed JSON) for every data line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

function onChunk(view, event) {
  if (event.error) throw new Error(event.error.message);
  for (const choice of event.choices || []) {
    const d = choice.delta || {};
    if (d.reasoning_content) view.reasoning(d.reasoning_content);
    if (d.content) view.content(d.content);
    if (d.tool_calls) view.toolCalls(d.tool_calls);
    if (choice.finish_reason) view.finish(choice.finish_reason);
  }
  $("log").scrollTop = $("log").scrollHeight;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  showError("");
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const view = replyView();
  controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: requestBody(), signal: controller.signal,
    });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    await readEvents(response, (event) => onChunk(view, event));
  } catch (e) {
    if (e.name === "AbortError") view.finish("stopped");
    else showError(e.message);
  } finally {
    history.push({ role: "assistant", content: view.text() });
    controller = null;
    busy(false);
  }
}

async function loadModel() {
  try {
    const health = await (await fetch("/health")).json();
    const size = health.parameters ? " · " + (health.parameters / 1e6).toFixed(1) + "M parameters" : "";
    $("model").textContent = health.model + size;
    $("model").dataset.name = health.model;
  } catch (e) {
    showError("cannot reach the server: " + e.message);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("log").replaceChildren();
  showError("");
});
loadModel();
