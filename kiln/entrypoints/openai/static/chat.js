// kiln's chat page: multi-turn streamed chat against this server's /v1/chat/completions.
// Conversations and settings live in localStorage; the API key (if the server wants one) is asked
// for once and kept there too. Model output is rendered by markdown.js, which never uses innerHTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const STORE = { chats: "kiln.conversations", current: "kiln.current", settings: "kiln.settings", key: "kiln.apiKey" };
  const SETTINGS = ["model", "system", "temperature", "top_p", "max_tokens", "seed", "extra"];
  let chats = load(STORE.chats, []);
  let currentId = load(STORE.current, null);
  let controller = null; // the AbortController of the request in flight (Stop aborts it)

  function load(key, fallback) {
    try { const v = localStorage.getItem(key); return v === null ? fallback : JSON.parse(v); } catch (e) { return fallback; }
  }
  function save() {
    localStorage.setItem(STORE.chats, JSON.stringify(chats));
    localStorage.setItem(STORE.current, JSON.stringify(currentId));
  }
  function current() {
    let chat = chats.find((c) => c.id === currentId);
    if (!chat) {
      chat = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
      chats.unshift(chat);
      currentId = chat.id;
    }
    return chat;
  }
  function status(text) { $("status").textContent = text; }

  // ---- API key: asked once, on the first 401 --------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = localStorage.getItem(STORE.key);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }
  async function api(path, options) {
    let r = await fetch(path, Object.assign({ headers: headers() }, options));
    if (r.status === 401) {
      const key = window.prompt("This kiln server needs an API key (kiln serve --api-key). It is kept in this browser.");
      if (key) {
        localStorage.setItem(STORE.key, key.trim());
        r = await fetch(path, Object.assign({}, options, { headers: headers() }));
      }
    }
    return r;
  }
  async function errorText(r) {
    try { const body = await r.json(); return (body.error && body.error.message) || JSON.stringify(body); } catch (e) { return r.statusText; }
  }

  // ---- rendering ----------------------------------------------------------------------
  function messageNode(m) {
    const node = document.createElement("div");
    node.className = "msg " + m.role;
    const content = document.createElement("div");
    content.className = "content";
    node.appendChild(content);
    const stats = document.createElement("div");
    stats.className = "stats";
    node.appendChild(stats);
    fill(node, m);
    return node;
  }
  function fill(node, m) {
    const content = node.querySelector(".content");
    if (m.role === "user") content.textContent = m.content; // user text is shown verbatim
    else content.replaceChildren(window.kilnMarkdown.render(m.content));
    node.querySelector(".stats").textContent = m.stats || "";
    node.dataset.state = m.state || "done";
  }
  function renderChat() {
    const chat = current();
    $("messages").replaceChildren(...chat.messages.map(messageNode));
    const list = $("conversations");
    list.replaceChildren(...chats.map((c) => {
      const li = document.createElement("li");
      li.textContent = c.title;
      li.title = c.title;
      if (c.id === chat.id) li.className = "active";
      li.addEventListener("click", () => { if (!controller) { currentId = c.id; save(); renderChat(); } });
      return li;
    }));
    $("messages").scrollTop = $("messages").scrollHeight;
  }

  // ---- settings -----------------------------------------------------------------------
  function readSettings() {
    const s = {};
    for (const id of SETTINGS) s[id] = $(id).value;
    localStorage.setItem(STORE.settings, JSON.stringify(s));
    return s;
  }
  function requestBody(chat, s) {
    const body = { model: s.model, stream: true, stream_options: { include_usage: true }, messages: [] };
    if (s.system.trim()) body.messages.push({ role: "system", content: s.system });
    for (const m of chat.messages) if (m.content && m.state !== "error") body.messages.push({ role: m.role, content: m.content });
    if (s.temperature !== "") body.temperature = Number(s.temperature);
    if (s.top_p !== "") body.top_p = Number(s.top_p);
    if (s.max_tokens !== "") body.max_tokens = Number(s.max_tokens);
    if (s.seed !== "") body.seed = Number(s.seed);
    if (s.extra.trim()) Object.assign(body, JSON.parse(s.extra)); // kiln extras: top_k, min_p, ignore_eos, ...
    return body;
  }
  async function loadModels() {
    const r = await api("/v1/models");
    if (!r.ok) { status("models: " + (await errorText(r))); return; }
    const saved = load(STORE.settings, {});
    const select = $("model");
    select.replaceChildren(...(await r.json()).data.map((m) => {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      return o;
    }));
    if (saved.model && [...select.options].some((o) => o.value === saved.model)) select.value = saved.model;
  }

  // ---- one streamed answer ------------------------------------------------------------
  function* sseEvents(buffer) {
    // yields [event data, rest of the buffer] for each complete "data: ..." event
    let cut;
    while ((cut = buffer.text.indexOf("\n\n")) >= 0) {
      const block = buffer.text.slice(0, cut);
      buffer.text = buffer.text.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
  function statsLine(tokens, ttft, first, last, suffix) {
    const parts = [tokens + " tokens"];
    if (ttft !== null) parts.push("TTFT " + Math.round(ttft) + " ms");
    if (tokens > 1 && last > first) parts.push(((tokens - 1) / ((last - first) / 1000)).toFixed(1) + " tok/s");
    return parts.join(" · ") + (suffix || "");
  }
  async function send(text) {
    let settings;
    try { settings = readSettings(); requestBody(current(), settings); } catch (e) { status("extra fields: " + e.message); return; }
    const chat = current();
    chat.messages.push({ role: "user", content: text });
    if (chat.title === "New chat") chat.title = text.slice(0, 40);
    const body = requestBody(chat, settings);
    const answer = { role: "assistant", content: "", stats: "", state: "streaming" };
    chat.messages.push(answer);
    save();
    renderChat();
    const node = $("messages").lastElementChild;
    controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const start = performance.now();
    let first = null, last = null, tokens = 0, usage = null, pending = false;
    const paint = () => { pending = false; fill(node, answer); $("messages").scrollTop = $("messages").scrollHeight; };
    try {
      const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
      if (!r.ok) throw new Error(await errorText(r));
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      const buffer = { text: "" };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer.text += decoder.decode(value, { stream: true });
        for (const data of sseEvents(buffer)) {
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "server error");
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            tokens += 1; // one streamed delta per engine output; replaced by usage at the end
            answer.content += delta.content;
            answer.stats = statsLine(tokens, first - start, first, last, " …");
            if (!pending) { pending = true; requestAnimationFrame(paint); }
          }
        }
      }
      answer.state = "done";
      answer.stats = statsLine(usage ? usage.completion_tokens : tokens, first === null ? null : first - start, first, last);
    } catch (e) {
      if (e.name === "AbortError") {
        answer.state = "stopped";
        answer.stats = statsLine(tokens, first === null ? null : first - start, first, last, " · stopped");
      } else {
        answer.state = "error";
        answer.content += (answer.content ? "\n\n" : "") + "Error: " + e.message;
      }
    } finally {
      controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      save();
      paint();
    }
  }

  // ---- wiring -------------------------------------------------------------------------
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  // Aborting the fetch closes the connection; the server sees the disconnect and aborts the request.
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("new-chat").addEventListener("click", () => { if (!controller) { currentId = null; current(); save(); renderChat(); } });
  $("delete-chat").addEventListener("click", () => {
    if (controller) return;
    chats = chats.filter((c) => c.id !== currentId);
    currentId = chats.length ? chats[0].id : null;
    save();
    renderChat();
  });
  $("forget-key").addEventListener("click", () => { localStorage.removeItem(STORE.key); status("API key forgotten"); });
  const saved = load(STORE.settings, {});
  for (const id of SETTINGS) if (saved[id] !== undefined && id !== "model") $(id).value = saved[id];
  for (const id of SETTINGS) $(id).addEventListener("change", readSettings);
  renderChat();
  loadModels();
})();
