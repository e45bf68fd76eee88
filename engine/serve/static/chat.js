// The chat page of `recipe serve`: plain JavaScript, no build step. Talks to the same server's /v1 API.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { models: [], model: null, history: [], busy: false, controller: null };
const SAMPLING = ["temperature", "top_p", "max_tokens", "repetition_penalty"];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text || ""; }

function bubble(role, text, name) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = name || (role === "user" ? "You" : role);
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("chat").append(div);
  $("chat").scrollTop = $("chat").scrollHeight;
  return div;
}

function render() {
  $("chat").innerHTML = "";
  const persona = state.model ? state.model.persona : {};
  for (const m of state.history) bubble(m.role, m.content, m.role === "assistant" ? persona.name : "You");
  updateButtons();
}

function updateButtons() {
  const last = state.history[state.history.length - 1];
  const canRegen = !state.busy && last && last.role === "assistant" && state.history.some((m) => m.role === "user");
  $("regenerate").disabled = !canRegen;
  $("send").disabled = state.busy;
  $("stop").hidden = !state.busy;
}

function selectModel(id) {
  state.model = state.models.find((m) => m.id === id) || state.models[0];
  const p = state.model.persona || {};
  document.title = (p.name || state.model.id) + " — Recipe chat";
  $("character-name").textContent = p.name || state.model.id;
  const d = p.defaults || {};
  for (const key of SAMPLING) $(key).value = d[key] == null ? "" : d[key];
  if (p.max_tokens_limit) $("max_tokens").max = p.max_tokens_limit;
  $("system_prompt").value = p.system_prompt || "";
  $("model-info").textContent = `${state.model.id}: ${p.precision} on ${p.device}, context ${p.max_context} tokens`;
  reset();
}

function reset() {
  if (state.controller) state.controller.abort();
  const p = (state.model && state.model.persona) || {};
  state.history = p.first_message ? [{ role: "assistant", content: p.first_message }] : [];
  setStatus("");
  render();
}

async function loadModels() {
  setStatus("loading characters…");
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) { setStatus("this server needs an API key: enter it in the panel on the right"); $("api_key").focus(); return; }
  const data = await r.json();
  state.models = data.data || [];
  const select = $("character");
  select.innerHTML = "";
  for (const m of state.models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = (m.persona && m.persona.name ? m.persona.name + " — " : "") + m.id;
    select.append(o);
  }
  $("character-choice").hidden = state.models.length < 2;
  if (state.models.length) selectModel(state.models[0].id);
  setStatus("");
}

function requestBody() {
  const body = { model: state.model.id, messages: [], stream: true, first_message: false };
  const system = $("system_prompt").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...state.history);
  for (const key of SAMPLING) {
    const v = $(key).value;
    if (v !== "") body[key] = key === "max_tokens" ? parseInt(v, 10) : parseFloat(v);
  }
  return body;
}

async function generate() {
  state.busy = true;
  updateButtons();
  setStatus("");
  const persona = state.model.persona || {};
  const div = bubble("assistant", "", persona.name);
  div.classList.add("streaming");
  const text = div.querySelector(".text");
  let reply = "";
  state.controller = new AbortController();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let at;
      while ((at = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, at);
        buffer = buffer.slice(at + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            reply += delta.content;
            text.textContent = reply;
            $("chat").scrollTop = $("chat").scrollHeight;
          }
        }
      }
    }
    state.history.push({ role: "assistant", content: reply });
    div.classList.add("done");
  } catch (e) {
    if (e.name === "AbortError") {
      if (reply) { state.history.push({ role: "assistant", content: reply }); div.classList.add("done"); }
      else div.remove();
    } else {
      div.remove();
      bubble("error", "Error: " + e.message, "server");
    }
  } finally {
    div.classList.remove("streaming");
    state.busy = false;
    state.controller = null;
    updateButtons();
  }
}

function send(event) {
  if (event) event.preventDefault();
  const message = $("message").value.trim();
  if (!message || state.busy || !state.model) return;
  $("message").value = "";
  state.history.push({ role: "user", content: message });
  bubble("user", message, "You");
  generate();
}

function regenerate() {
  if (state.busy) return;
  const last = state.history[state.history.length - 1];
  if (!last || last.role !== "assistant") return;
  state.history.pop();
  render();
  generate();
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("regenerate").addEventListener("click", regenerate);
$("reset").addEventListener("click", reset);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("character").addEventListener("change", (e) => selectModel(e.target.value));
$("api_key").addEventListener("change", () => { localStorage.setItem("recipe_api_key", $("api_key").value); loadModels(); });
$("api_key").value = localStorage.getItem("recipe_api_key") || "";
loadModels().catch((e) => setStatus("cannot reach the server: " + e.message));
