"""The web chat page `lmforge serve` shows at `/`: one HTML file, no build step.

The server sends ``PAGE`` verbatim (nothing is substituted into it); the page learns
everything from the API. What it knows:

* the model's name and context (``max_model_len``) come from ``GET /v1/models``; every
  piece of text (model name, messages, replies, errors) goes into the page through
  ``textContent``, never ``innerHTML``, so nothing the server or a user sends is markup;
* it keeps the conversation in the page and, before each request, asks ``POST /tokenize``
  how long the prompt is; it drops the oldest turns (a user message and its reply, the
  system message is kept) until at least ``RESERVE`` tokens are left for the reply, says
  so in a ``.notice`` line, and asks for ``max_tokens`` = what the context leaves, capped
  at ``MAX_REPLY``;
* every error the server returns (HTTP status and the OpenAI error message, also an
  ``error`` event inside a stream, or a network failure) is shown in an error bubble
  (``.assistant.error``); a reply bubble is never left blank (an empty reply says so);
* ``/?q=text`` pre-fills the message box and never sends;
* when the server answers 401 it shows an API-key field; the key is kept in
  ``sessionStorage`` (this tab only) and sent as ``Authorization: Bearer``.

What it does not know: it renders no Markdown, keeps nothing across page loads but the
key, and does not retry a failed request by itself (the text goes back into the box).

Element ids the tests rely on: ``#model`` (model name), ``#ctx`` (context length),
``#msg`` / ``#send`` (the form), ``#log`` (bubbles: ``.user``, ``.assistant``, with
``id="reply-N"`` for the N-th message, ``data-done`` once finished, ``data-error`` on an
error), ``.notice`` lines, ``#keyrow`` / ``#key`` / ``#usekey`` (the API key).
"""

MAX_REPLY = 256  # the most tokens one reply asks for
RESERVE = 64  # drop old turns until at least this many tokens (or a quarter of the context) are left

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:16px system-ui,sans-serif;max-width:760px;margin:2em auto;padding:0 1em;color:#222}
#log div{white-space:pre-wrap;margin:.6em 0;padding:.6em .8em;border-radius:8px}
.user{background:#e8f0fe}.assistant{background:#f3f3f3}.assistant.error{background:#fde8e8;color:#900}
#log .notice{background:none;color:#666;font-size:.85em;padding:0 .8em}.empty{color:#888;font-style:italic}
form{display:flex;gap:.5em}textarea{flex:1;height:3em;font:inherit}
#keyrow{margin:.5em 0}#keyrow[hidden]{display:none}small{color:#666}
details{margin:.5em 0}#system{width:100%;height:3em;font:inherit}
</style></head><body>
<h1>lmforge chat <small id="model">connecting...</small> <small id="ctx"></small></h1>
<div id="keyrow" hidden>This server wants an API key:
  <input id="key" type="password" autocomplete="off" size="32"> <button id="usekey" type="button">Use key</button>
  <small>(kept in this tab only)</small></div>
<details><summary>System message</summary><textarea id="system" placeholder="(none)"></textarea></details>
<div id="log"></div>
<form id="f"><textarea id="msg" placeholder="Say something..."></textarea><button id="send">Send</button></form>
<script>
"use strict";
const MAX_REPLY = __MAX_REPLY__, RESERVE = __RESERVE__, KEY = "lmforge-api-key";
const $ = (id) => document.getElementById(id);
const log = $("log");
const messages = [];   // the whole conversation shown: {role, content}
let first = 0;         // messages[first:] is what is still sent (older turns were dropped)
let turns = 0, model = null, ctxLen = null, busy = false;

function add(cls, text) {
  const d = document.createElement("div"); d.className = cls; d.textContent = text;
  log.appendChild(d); d.scrollIntoView({block: "end"}); return d;
}
function headers() {
  const h = {"Content-Type": "application/json"};
  const k = sessionStorage.getItem(KEY); if (k) h["Authorization"] = "Bearer " + k;
  return h;
}
class HTTPError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
async function errorOf(r) {  // the OpenAI error object's message, or whatever the body says
  const text = await r.text(); let msg = text;
  try { const j = JSON.parse(text); msg = (j.error && (j.error.message || JSON.stringify(j.error))) || j.detail || text; }
  catch (e) {}
  const hint = r.status === 401 ? " (enter the API key above, then send again)" : "";
  return new HTTPError(r.status, "HTTP " + r.status + (r.statusText ? " " + r.statusText : "") + ": " +
                       (msg || "(no body)") + hint);
}
function needKey() { $("keyrow").hidden = false; $("key").focus(); }
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body)});
  if (r.status === 401) needKey();
  if (!r.ok) throw await errorOf(r);
  return r;
}
async function fetchModel() {  // throws the server's error
  const j = await (await api("GET", "/v1/models")).json();
  const m = j.data[0]; model = m.id; ctxLen = m.max_model_len || null;
  $("model").textContent = model; $("ctx").textContent = ctxLen ? "(" + ctxLen + "-token context)" : "";
  document.title = "lmforge chat: " + model;
  $("keyrow").hidden = true;
}
async function loadModel() {  // shows the server's error
  try {
    await fetchModel();
  } catch (e) {
    $("model").textContent = "(not connected)";
    const b = add("assistant error", "Could not read /v1/models: " + e.message); b.dataset.error = "1"; b.dataset.done = "1";
  }
}
$("usekey").addEventListener("click", () => {
  const k = $("key").value.trim(); if (k) sessionStorage.setItem(KEY, k); else sessionStorage.removeItem(KEY);
  loadModel();
});

async function countTokens(msgs) {
  return await (await api("POST", "/tokenize", {messages: msgs, add_generation_prompt: true})).json();
}
// The messages to send: the system message (if any), then messages[first:], dropping the
// oldest user turn (and the replies after it) until the reply has room. Returns {msgs, room, dropped}.
async function fit() {
  const sys = $("system").value.trim();
  const head = sys ? [{role: "system", content: sys}] : [];
  let dropped = 0;
  for (;;) {
    const msgs = head.concat(messages.slice(first));
    const t = await countTokens(msgs);
    const ctx = t.max_model_len || ctxLen; ctxLen = ctx;
    const room = ctx - t.count, want = Math.min(RESERVE, Math.floor(ctx / 4));
    let next = -1;  // the next user message after the oldest one still sent
    for (let i = first + 1; i < messages.length; i++) if (messages[i].role === "user") { next = i; break; }
    if (room >= want || next < 0) {
      if (room < 1) throw new HTTPError(400, "Your message is too long: the prompt is " + t.count +
        " tokens and the model's context is " + ctx + " tokens (nothing older is left to drop).");
      return {msgs, room, dropped, ctx};
    }
    first = next; dropped++;
  }
}

function fail(out, e, partial) {
  out.className = "assistant error"; out.dataset.error = "1";
  const msg = (e && e.message) ? e.message : String(e);
  out.textContent = partial ? partial + "\n\n[" + msg + "]" : msg;
}

async function send(text) {
  busy = true; $("send").disabled = true;
  turns++;
  messages.push({role: "user", content: text}); add("user", text);
  const out = add("assistant", "\u2026"); out.id = "reply-" + (2 * turns - 1);
  let reply = "", failed = false;
  try {
    if (model === null) await fetchModel();
    const f = await fit();
    if (f.dropped) {
      const n = add("notice", "dropped " + f.dropped + " earlier turn" + (f.dropped === 1 ? "" : "s") +
                    " to fit the " + f.ctx + "-token context");
      log.insertBefore(n, out.previousSibling);
    }
    const r = await api("POST", "/v1/chat/completions", {model, messages: f.msgs, stream: true,
                        max_tokens: Math.min(MAX_REPLY, f.room), temperature: 0.8});
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "", finish = null;
    const handle = (data) => {
      if (data === "[DONE]") return;
      let ev; try { ev = JSON.parse(data); } catch (e) { throw new Error("a stream event that is not JSON: " + data); }
      if (ev.error) throw new Error("error in the stream: " + (ev.error.message || JSON.stringify(ev.error)));
      const c = ev.choices && ev.choices.length ? ev.choices[0] : null;
      if (c && c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
      if (c && c.finish_reason) finish = c.finish_reason;
    };
    for (;;) {
      const {value, done} = await reader.read();
      buf += dec.decode(value || new Uint8Array(), {stream: !done});
      buf = buf.replace(/\r\n/g, "\n");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        const data = ev.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(l[5] === " " ? 6 : 5));
        if (data.length) handle(data.join("\n"));
      }
      if (done) break;
    }
    if (!reply) {
      out.classList.add("empty");
      out.textContent = "(the model's reply was empty; finish_reason: " + (finish || "none") + ")";
    }
  } catch (e) {
    failed = true; fail(out, e, reply);
  }
  if (failed && !reply) {  // the turn did not happen: forget it and give the text back
    messages.pop(); first = Math.min(first, messages.length);
    if (!$("msg").value) $("msg").value = text;
  } else {
    messages.push({role: "assistant", content: reply});
  }
  out.dataset.done = "1";
  busy = false; $("send").disabled = false;
}

$("f").addEventListener("submit", (e) => {
  e.preventDefault();
  const box = $("msg"); const text = box.value.trim(); if (!text || busy) return;
  box.value = ""; send(text);
});
$("msg").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("f").requestSubmit(); }
});
// /?q=... only fills the box (a link must not make the page talk for the user)
const q = new URLSearchParams(location.search).get("q");
if (q) $("msg").value = q;
loadModel();
</script></body></html>
""".replace("__MAX_REPLY__", str(MAX_REPLY)).replace("__RESERVE__", str(RESERVE))
