"""The web chat page `lmforge serve` shows at `/`: one HTML file, no build step.
It keeps the conversation in the page and streams replies from /v1/chat/completions."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge chat: __MODEL__</title>
<style>
body{font:16px system-ui,sans-serif;max-width:760px;margin:2em auto;padding:0 1em;color:#222}
#log div{white-space:pre-wrap;margin:.6em 0;padding:.6em .8em;border-radius:8px}
.user{background:#e8f0fe}.assistant{background:#f3f3f3}
form{display:flex;gap:.5em}textarea{flex:1;height:3em;font:inherit}
</style></head><body>
<h1>lmforge chat <small id="model">__MODEL__</small></h1>
<div id="log"></div>
<form id="f"><textarea id="msg" placeholder="Say something..."></textarea><button id="send">Send</button></form>
<script>
const messages = [];
const log = document.getElementById("log");
function add(role, text){const d=document.createElement("div");d.className=role;d.textContent=text;log.appendChild(d);return d;}
document.getElementById("f").addEventListener("submit", async (e) => {
  e.preventDefault();
  const box = document.getElementById("msg"); const text = box.value.trim(); if (!text) return;
  box.value = ""; messages.push({role: "user", content: text}); add("user", text);
  const out = add("assistant", ""); out.id = "reply-" + messages.length;
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: "__MODEL__", messages, stream: true, max_tokens: 200, temperature: 0.8})});
  const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "", reply = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i; while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!line.startsWith("data: ")) continue; const data = line.slice(6);
      if (data === "[DONE]") { out.dataset.done = "1"; continue; }
      const ev = JSON.parse(data); const d = ev.choices.length ? ev.choices[0].delta : null;
      if (d && d.content) { reply += d.content; out.textContent = reply; }
    }
  }
  messages.push({role: "assistant", content: reply}); out.dataset.done = "1";
});
// /?q=... sends that first message on load (a link that opens a conversation)
const q = new URLSearchParams(location.search).get("q");
if (q) { document.getElementById("msg").value = q; document.getElementById("send").click(); }
</script></body></html>
"""
