// Voice chat page for the TTS server: plain JavaScript, no build step, nothing loaded from elsewhere.
// Audio arrives as streamed 16-bit PCM chunks; each chunk is scheduled to start exactly where the previous one
// ends on the AudioContext clock (never chained on `onended`, which leaves gaps).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, info: null, rate: 24000, ctx: null, sources: new Set(), turns: new Map(), current: null, seq: 0,
  voiceWav: null, recorder: null, infoTimer: null,
};
// Test hook: what arrived and when each chunk was scheduled (seconds on the AudioContext clock).
const stats = { chunks: 0, scheduled: [], completed: [], cancelled: [], errors: [], underruns: 0, highlighted: 0 };
window.__tts = { stats, state };

const keyInAddress = new URLSearchParams(location.search).get("api_key");
if (keyInAddress) {  // opened as /?api_key=...: keep the key, take it out of the address bar
  localStorage.setItem("tts.apiKey", keyInAddress);
  history.replaceState(null, "", location.pathname);
}
const apiKey = () => localStorage.getItem("tts.apiKey") || "";
function withKey(path) {
  const key = apiKey();
  return key ? `${path}${path.includes("?") ? "&" : "?"}api_key=${encodeURIComponent(key)}` : path;
}

function setPill(el, text, kind) { el.textContent = text; el.className = `pill ${kind || ""}`; }
function showError(text) { $("error").textContent = text; if (text) stats.errors.push(text); }

// ---- server info ---------------------------------------------------------------------------------------------
async function loadInfo() {
  clearTimeout(state.infoTimer);
  try {
    const resp = await fetch(withKey("/v1/info"));
    if (!resp.ok) throw new Error(resp.status === 401 ? "the server needs an API key (see Settings)" : `HTTP ${resp.status}`);
    const info = await resp.json();
    const first = !state.info;
    state.info = info;
    state.rate = info.sample_rate;
    const serving = info.serving.engine;
    setPill($("engine"), serving ? `engine: ${serving}` : "model loading…", serving ? "on" : "wait");
    $("engine").title = info.serving.reason;
    if (first) fillPickers(info);
    showDetector(info);  // talk.js
    if (!serving) state.infoTimer = setTimeout(loadInfo, 2000);  // follow loading progress
  } catch (err) {
    showError(`Cannot read server info: ${err.message}`);
  }
}

function fillPickers(info) {
  const speakers = new Set([0, 1, 2, 3, ...(info.voices || [])]);
  $("speaker").replaceChildren(...[...speakers].sort((a, b) => a - b).map((s) => new Option(String(s), String(s))));
  const emotions = Object.entries(info.emotions || {});
  $("emotion").replaceChildren(new Option("none", ""),
    ...emotions.map(([name, count]) => new Option(`${name} (${count})`, name)));
}

// ---- connection ----------------------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const session = localStorage.getItem("tts.session");  // resumed on every (re)connection
  const ws = new WebSocket(withKey(`${proto}://${location.host}/ws${session ? `?session=${encodeURIComponent(session)}` : ""}`));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  setPill($("conn"), "connecting…", "wait");
  let opened = false;
  ws.onopen = () => {
    opened = true; setPill($("conn"), "connected", "on"); showError(""); loadInfo();
    if (!session) ws.send(JSON.stringify({ type: "session" }));  // a new conversation, kept across reloads
  };
  ws.onclose = async () => {
    if (state.ws !== ws) return;
    setPill($("conn"), "disconnected", "off");
    // A refused key fails the handshake with HTTP 401, which a WebSocket cannot see: ask over plain HTTP.
    if (!opened && await keyRefused()) { askForKey(); return; }  // no retry loop with a wrong key
    setTimeout(connect, 2000);
  };
  ws.onmessage = (event) => (typeof event.data === "string" ? onReply(JSON.parse(event.data)) : onAudio(event.data));
}

async function keyRefused() {
  try { return (await fetch(withKey("/v1/info"))).status === 401; } catch { return false; }
}

function askForKey() {
  showError(apiKey() ? "The server refused this API key: enter the right one in Settings"
                     : "This server needs an API key: enter it in Settings");
  $("settings").open = true;
  $("api-key").focus();
}

function onReply(msg) {
  if (talkReply(msg)) return;  // the voice chat's own messages (talk.js)
  const turn = msg.request_id ? state.turns.get(msg.request_id) : null;
  switch (msg.status) {
    case "loading":
      if (turn) turn.meta.textContent = "queued: the model is loading…"; else loadInfo();
      break;
    case "start":
      state.rate = msg.sample_rate;
      state.current = turn;
      if (turn) { turn.engine = msg.engine; turn.meta.textContent = `speaking (${msg.engine})…`; }
      break;
    case "words":
      if (turn) addWords(turn, msg.words);
      break;
    case "success":
      if (turn) finishTurn(turn, msg);
      break;
    case "cancelled":
      if (turn) { turn.status = "cancelled"; turn.meta.textContent = "stopped"; stats.cancelled.push(msg.request_id); }
      settle(turn);
      break;
    case "error":
      showError(`${msg.code}: ${msg.message}`);
      if (turn) { turn.status = "failed"; turn.el.classList.add("failed"); turn.meta.textContent = `error: ${msg.code}`; }
      settle(turn);
      if (msg.code === "invalid_voice") $("voice-status").textContent = msg.message;
      break;
    case "voice_saved":
      $("voice-status").textContent = `Saved as the voice of speaker ${msg.speaker} (${msg.duration_s.toFixed(1)} s).`;
      break;
    case "voice_cleared":
      $("voice-status").textContent = `Speaker ${msg.speaker} uses the server's default voice again.`;
      break;
    case "reset":
      addNote("Conversation history cleared.");
      break;
  }
}

function settle(turn) {
  if (turn && state.current === turn) state.current = null;
  $("stop").disabled = ![...state.turns.values()].some((t) => t.status === "pending");
}

// ---- speaking ------------------------------------------------------------------------------------------------
function speak(text) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { showError("Not connected yet."); return; }
  audioContext();  // create/resume inside the user gesture
  const id = `turn-${Date.now().toString(36)}-${state.seq++}`;
  const speaker = Number($("speaker").value || 0);
  const emotion = $("emotion").value || null;
  const request = { type: "synthesize", request_id: id, text, speaker, stream: true, format: "pcm",
                    context: $("context").checked, timestamps: $("highlight").checked };
  if (emotion) request.emotion = emotion;
  const turn = addTurn({ id, text, speaker, emotion });
  state.ws.send(JSON.stringify(request));
  $("stop").disabled = false;
  return turn;
}

function addTurn({ id, text, speaker, emotion, role = "assistant" }) {
  const el = document.createElement("div");
  el.className = `turn ${role}`;
  const body = document.createElement("div");
  body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `speaker ${speaker}${emotion ? ` · ${emotion}` : ""} · sending…`;
  el.append(body, meta);
  $("chat").append(el);
  el.scrollIntoView({ block: "end" });
  const turn = { id, text, speaker, emotion, el, meta, status: "pending", sentAt: performance.now(),
                 firstAt: null, chunks: [], nextTime: 0 };
  state.turns.set(id, turn);
  return turn;
}

function addNote(text) {
  const el = document.createElement("p");
  el.className = "note";
  el.textContent = text;
  $("chat").append(el);
}

function finishTurn(turn, msg) {
  turn.status = "done";
  const ttfa = turn.firstAt === null ? NaN : turn.firstAt - turn.sentAt;
  const rtf = msg.generation_s / msg.duration_s;
  turn.meta.textContent = `speaker ${turn.speaker}${turn.emotion ? ` · ${turn.emotion}` : ""} · ${msg.engine}` +
    ` · first audio ${Math.round(ttfa)} ms · RTF ${rtf.toFixed(2)} · ${msg.duration_s.toFixed(2)} s`;
  const replay = document.createElement("button");
  replay.textContent = "Replay";
  replay.onclick = () => replayTurn(turn);
  const save = document.createElement("button");
  save.textContent = "Save WAV";
  save.onclick = () => saveTurn(turn);
  turn.meta.append(replay, save);
  stats.completed.push({ request_id: turn.id, chunks: turn.chunks.length, ttfa_ms: ttfa, rtf,
                         duration_s: msg.duration_s, engine: msg.engine });
  settle(turn);
}

// ---- words: each one lights up as it is heard ------------------------------------------------------------------
function addWords(turn, words) {
  turn.words = (turn.words || []).concat(words);
  const body = turn.el.firstChild;
  const text = body.textContent.split(/\s+/).filter(Boolean);
  const spans = turn.words.map((w) => Object.assign(document.createElement("span"), { className: "word",
                                                                                    textContent: w.word }));
  const rest = text.slice(turn.words.length).join(" ");
  body.replaceChildren(...spans.flatMap((span) => [span, " "]), rest);
  turn.spans = spans;
  highlight();
}

function highlight() {
  if (state.highlighting) return;
  state.highlighting = true;
  const step = () => {
    let active = false;
    for (const turn of state.turns.values()) {
      if (!turn.spans || turn.playStart === undefined || !state.ctx) continue;
      const heard = state.ctx.currentTime - turn.playStart;
      turn.spans.forEach((span, i) => {
        const said = turn.status !== "stopping" && turn.words[i].start_s <= heard;
        if (said && !span.classList.contains("heard")) { span.classList.add("heard"); stats.highlighted++; }
      });
      active = active || turn.spans.some((span) => !span.classList.contains("heard"));
    }
    if (active) requestAnimationFrame(step); else state.highlighting = false;
  };
  requestAnimationFrame(step);
}

// ---- audio ---------------------------------------------------------------------------------------------------
function audioContext() {
  if (!state.ctx) {
    try { state.ctx = new AudioContext({ sampleRate: state.rate }); }
    catch (err) { state.ctx = new AudioContext(); }  // this browser cannot run at the server's rate: resample
  }
  if (state.ctx.state === "suspended") state.ctx.resume();
  return state.ctx;
}

function onAudio(data) {
  const turn = state.current;
  if (!turn || turn.status !== "pending") return;  // stopped: drop what was still in flight
  if (turn.firstAt === null) turn.firstAt = performance.now();
  const pcm = new Int16Array(data);
  turn.chunks.push(pcm);
  schedule(turn, pcm);
}

function schedule(turn, pcm) {
  const ctx = audioContext();
  let samples = Float32Array.from(pcm, (s) => s / 32768);
  if (ctx.sampleRate !== state.rate) samples = resample(samples, state.rate, ctx.sampleRate);
  const buffer = ctx.createBuffer(1, samples.length, ctx.sampleRate);
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  if (turn.nextTime < ctx.currentTime + 0.01) {  // first chunk, or the network fell behind playback
    if (turn.nextTime > 0) stats.underruns++;
    turn.nextTime = ctx.currentTime + 0.1;
  }
  const start = turn.nextTime;
  if (turn.playStart === undefined) turn.playStart = start;  // barge-in measures what was heard from here
  source.start(start);
  turn.nextTime = start + buffer.duration;
  state.sources.add(source);
  source.onended = () => state.sources.delete(source);  // bookkeeping only; the next chunk is already scheduled
  stats.chunks++;
  stats.scheduled.push({ request_id: turn.id, start, end: turn.nextTime });
}

function resample(input, from, to) {
  const out = new Float32Array(Math.round(input.length * to / from));
  for (let i = 0; i < out.length; i++) {
    const x = i * from / to, j = Math.floor(x), f = x - j;
    out[i] = (input[j] || 0) * (1 - f) + (input[j + 1] || input[j] || 0) * f;
  }
  return out;
}

function silence() {
  for (const source of state.sources) { try { source.stop(); } catch (err) { /* already stopped */ } }
  state.sources.clear();
}

function stop() {
  silence();
  for (const turn of state.turns.values()) {
    if (turn.status !== "pending") continue;
    turn.status = "stopping";
    state.ws.send(JSON.stringify({ type: "cancel", request_id: turn.id }));
  }
  state.current = null;
  $("stop").disabled = true;
}

function replayTurn(turn) {
  silence();
  turn.nextTime = 0;
  for (const pcm of turn.chunks) schedule(turn, pcm);
}

function wavBytes(pcmChunks, rate) {
  const length = pcmChunks.reduce((n, c) => n + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * length));
  const text = (offset, s) => [...s].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * length, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * length, true);
  let offset = 44;
  for (const chunk of pcmChunks) for (const s of chunk) { view.setInt16(offset, s, true); offset += 2; }
  return view.buffer;
}

function saveTurn(turn) {
  const url = URL.createObjectURL(new Blob([wavBytes(turn.chunks, state.rate)], { type: "audio/wav" }));
  const link = Object.assign(document.createElement("a"), { href: url, download: `${turn.id}.wav` });
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---- voice prompt --------------------------------------------------------------------------------------------
async function toWav(blob) {
  const decoded = await audioContext().decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    decoded.getChannelData(c).forEach((v, i) => { mono[i] += v / decoded.numberOfChannels; });
  }
  const pcm = Int16Array.from(mono, (v) => Math.max(-32768, Math.min(32767, Math.round(v * 32767))));
  return wavBytes([pcm], decoded.sampleRate);
}

async function useVoiceBlob(blob, label) {
  try {
    state.voiceWav = await toWav(blob);
    $("voice-upload").disabled = false;
    $("voice-status").textContent = `${label} ready: type its transcript and upload.`;
  } catch (err) {
    $("voice-status").textContent = `Cannot read that audio: ${err.message}`;
  }
}

async function toggleRecording() {
  if (state.recorder) { state.recorder.stop(); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const parts = [];
    const recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => parts.push(e.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      state.recorder = null;
      $("record").textContent = "Record";
      useVoiceBlob(new Blob(parts, { type: recorder.mimeType }), "Recording");
    };
    recorder.start();
    state.recorder = recorder;
    $("record").textContent = "Stop recording";
  } catch (err) {
    $("voice-status").textContent = `Microphone unavailable: ${err.message}`;
  }
}

function uploadVoice() {
  const text = $("voice-text").value.trim();
  if (!text) { $("voice-status").textContent = "Type the exact transcript of the clip first."; return; }
  const speaker = Number($("speaker").value || 0);
  state.ws.send(JSON.stringify({ type: "voice", speaker, text }));
  state.ws.send(state.voiceWav);
  $("voice-status").textContent = "Uploading…";
}

// ---- wiring --------------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (text) { speak(text); $("text").value = ""; }
});
$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").onclick = stop;
$("reset").onclick = () => state.ws && state.ws.send(JSON.stringify({ type: "reset" }));
$("record").onclick = toggleRecording;
$("voice-file").onchange = (event) => event.target.files[0] && useVoiceBlob(event.target.files[0], "File");
$("voice-upload").onclick = uploadVoice;
$("voice-clear").onclick = () => state.ws.send(JSON.stringify({ type: "voice", speaker: Number($("speaker").value || 0), clear: true }));
$("api-key").value = apiKey();
$("save-key").onclick = () => {
  localStorage.setItem("tts.apiKey", $("api-key").value.trim());
  if (state.ws) { const old = state.ws; state.ws = null; old.close(); }
  state.info = null;
  connect();
};
window.addEventListener("DOMContentLoaded", connect);  // after talk.js has loaded too
