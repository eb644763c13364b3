// Voice chat: the microphone streams the user's turns (hands-free, ended by the server's turn detector, or
// press-to-talk: hold the space bar or the Talk button), the chat model's answer is shown as it is written and
// spoken as it comes, the user's voice cuts the answer off (barge-in), the page shows what the conversation is
// doing (idle, listening, thinking, speaking), and the conversation (a server session) survives a reload.
"use strict";

const talk = { mic: null, mode: null, restored: false, listening: null, answerSpeaker: 0, respond: false, open: false,
               thinking: false, state: "idle", recheck: null, hold: null, swallowClick: false };
stats.talk = { saved: [], replyText: 0, speechStarts: 0, bargeIns: [], firstAudioAt: {}, restored: 0, states: [],
               sentSamples: 0 };
window.__tts.talk = talk;

function canChat() { return !!(state.info && state.info.conversation && state.info.conversation.chat); }
function userSpeaker() { return Number($("speaker").value || 0) === 0 ? 1 : 0; }

// ---- the server's voice-chat messages ------------------------------------------------------------------------
function talkReply(msg) {
  followTalk(msg);
  switch (msg.status) {
    case "session":
      localStorage.setItem("tts.session", msg.session);
      if (msg.turns > 0 && !talk.restored) showTranscript(msg.session);
      talk.restored = true;
      return true;
    case "speech_start":
      stats.talk.speechStarts++;
      bargeIn();
      return true;
    case "speech_end":
      return true;
    case "turn_saved":  // its id is the page's own: msg.turns stops growing once the history is full
      stats.talk.saved.push(msg);
      addTurn({ id: `said-${state.seq++}`, text: msg.text, speaker: msg.speaker, role: "user" }).status = "said";
      return true;
    case "reply_text": {
      const turn = answerTurn(msg.request_id);
      if (turn.spans) turn.body.append(msg.delta); else turn.body.textContent += msg.delta;
      stats.talk.replyText++;
      return true;
    }
    case "start":
      if (state.turns.has(msg.request_id)) stats.talk.firstAudioAt[msg.request_id] = Date.now();
      return false;
    case "truncated":
      addNote(`Cut off after ${msg.kept_s.toFixed(1)} s: only what you heard stays in the conversation.`);
      return true;
    case "error":
      if (msg.code === "unknown_session") {  // expired or deleted: start a new one
        localStorage.removeItem("tts.session");
        state.ws.send(JSON.stringify({ type: "session" }));
        return true;
      }
      if (msg.code === "model_unavailable" && !state.turns.has(msg.request_id)) {
        showError(`The assistant cannot answer: ${msg.message}`);
        return true;
      }
      return false;
  }
  return false;
}

function answerTurn(id) {
  let turn = state.turns.get(id);
  if (!turn) {
    turn = addTurn({ id, text: "", speaker: talk.answerSpeaker });
    turn.body = turn.el.firstChild;
    turn.meta.textContent = "writing…";
    $("stop").disabled = false;
  }
  return turn;
}

async function showTranscript(session) {
  try {
    const resp = await fetch(withKey(`/v1/sessions/${encodeURIComponent(session)}`));
    if (!resp.ok) return;
    const { turns } = await resp.json();
    addNote("Resumed the conversation:");
    for (const [i, t] of turns.entries()) {
      const el = addTurn({ id: `restored-${i}`, text: t.text, speaker: t.speaker,
                           role: t.speaker === Number($("speaker").value || 0) ? "assistant" : "user" });
      el.status = "restored";
      el.meta.textContent = `speaker ${t.speaker} · ${t.duration_s.toFixed(1)} s`;
    }
    stats.talk.restored = turns.length;
  } catch (err) {
    showError(`Cannot read the conversation: ${err.message}`);
  }
}

// ---- what the conversation is doing: idle, listening, thinking (transcribing, writing the answer), speaking ----
// Each server message can change it; it is worked out once app.js has handled the message too.
const THINKING_AFTER = { speech_start: false, speech_end: true, reply_text: true, start: false, success: false,
                         cancelled: false, error: false };

function followTalk(msg) {
  const turn = msg.request_id ? state.turns.get(msg.request_id) : null;
  const stale = msg.status === "cancelled" && turn && turn.status === "stopping";  // an answer cut off earlier
  if (msg.status in THINKING_AFTER && !stale) talk.thinking = THINKING_AFTER[msg.status];
  if (msg.status === "turn_saved" && !talk.respond) talk.thinking = false;  // heard; no answer comes
  queueMicrotask(showTalkState);
}

function playbackEnd() {  // when the answers' audio already scheduled stops playing (AudioContext clock)
  let end = 0;
  for (const turn of state.turns.values()) if (turn.status === "done") end = Math.max(end, turn.nextTime);
  return end;
}

function talkState() {
  const now = state.ctx ? state.ctx.currentTime : 0;
  const streaming = state.current && state.current.status === "pending";
  if (streaming || playbackEnd() > now) return "speaking";
  if (talk.thinking) return "thinking";
  return talk.mode ? "listening" : "idle";
}

function showTalkState() {
  const now = talkState();
  clearTimeout(talk.recheck);
  if (now === "speaking" && state.ctx) {  // look again once the audio played so far has been heard
    talk.recheck = setTimeout(showTalkState, 1000 * Math.max(0, playbackEnd() - state.ctx.currentTime) + 50);
  }
  if (now === talk.state) return;
  talk.state = now;
  $("talk-state").textContent = now;
  $("talk-state").className = `pill ${now}`;
  stats.talk.states.push(now);
}

function showDetector(info) {  // from app.js, whenever the server's info is read
  const c = info.conversation || {};
  $("detector").textContent = c.turn_detector ? `turn detector: ${c.turn_detector}` : "";
  $("detector").title = c.turn_detector === "smart-turn"
    ? `A ${c.vad_silence_ms} ms pause proposes the end of your turn and Smart Turn confirms it; ` +
      `${c.turn_max_silence_ms} ms of silence ends it anyway`
    : `A ${c.vad_silence_ms} ms pause ends your turn`;
}

// ---- barge-in: the user speaks over the answer -------------------------------------------------------------
function bargeIn() {
  const now = state.ctx ? state.ctx.currentTime : 0;
  for (const turn of state.turns.values()) {
    const playing = turn.playStart !== undefined && turn.nextTime > now;
    if (!(turn.status === "pending" || (turn.status === "done" && playing))) continue;
    const played = turn.playStart === undefined ? 0 : Math.max(0, Math.min(now, turn.nextTime) - turn.playStart);
    const playedMs = Math.round(1000 * played);
    turn.status = "stopping";
    turn.meta.textContent = `interrupted after ${(playedMs / 1000).toFixed(1)} s`;
    state.ws.send(JSON.stringify({ type: "cancel", request_id: turn.id, played_ms: playedMs }));
    stats.talk.bargeIns.push({ request_id: turn.id, played_ms: playedMs });
  }
  silence();
  state.current = null;
}

// ---- the microphone ------------------------------------------------------------------------------------------
async function openMic() {
  // Echo cancellation keeps the answer coming out of the speakers from sounding like the user barging in.
  const stream = await navigator.mediaDevices.getUserMedia(
    { audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/mic-worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const sender = new AudioWorkletNode(ctx, "pcm-sender");
  const mute = ctx.createGain();
  mute.gain.value = 0;  // pulled by the graph, never heard
  source.connect(sender).connect(mute).connect(ctx.destination);
  sender.port.onmessage = (event) => {
    if (!talk.mode || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    state.ws.send(event.data);
    stats.talk.sentSamples += event.data.byteLength / 2;
  };
  return { stream, ctx };
}

async function startTalking(mode) {
  if (talk.mode) return;
  const conversation = state.info && state.info.conversation;
  if (!conversation || conversation.stt === "off") {
    showError("This server has no speech recognition (start it with --stt-model), so it cannot hear you; type instead.");
    return;
  }
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { showError("Not connected yet."); return; }
  talk.mode = mode;
  audioContext();  // playback, unlocked inside the user's gesture
  try {
    talk.mic = talk.mic || await openMic();
  } catch (err) {
    talk.mode = null;
    showError(err.name === "NotAllowedError"
      ? "Microphone permission was denied: allow the microphone for this page, then press Talk again."
      : `The microphone is unavailable: ${err.message}`);
    return;
  }
  if (talk.mode !== mode) { closeMic(); return; }  // let go before the microphone opened
  showError("");
  talk.answerSpeaker = Number($("speaker").value || 0);
  talk.respond = canChat();
  const request = { type: "turn_start", speaker: userSpeaker(), sample_rate: talk.mic.ctx.sampleRate,
                    vad: mode === "hands-free" };
  if (talk.respond) request.respond = { speaker: talk.answerSpeaker, timestamps: $("highlight").checked };
  const language = browserLanguage();
  if (language) request.language = language;  // transcribed without detecting it: faster
  state.ws.send(JSON.stringify(request));
  talk.open = true;
  $("talk").textContent = mode === "hands-free" ? "Stop talking" : "Talking…";
  $("talk").setAttribute("aria-pressed", "true");
  setTalkNote(mode === "hands-free" ? "a pause ends your turn" : "speak, then let go");
  if (mode === "push") bargeIn();  // pressing to talk interrupts the answer at once
  showTalkState();
}

function stopTalking() {
  if (!talk.mode) return;
  const open = talk.open && state.ws && state.ws.readyState === WebSocket.OPEN;
  if (open && talk.mode === "push") talk.thinking = true;  // the turn is transcribed now: turn_saved or an error
  talk.mode = null;
  talk.open = false;
  if (open) state.ws.send(JSON.stringify({ type: "turn_end" }));
  closeMic();
  $("talk").textContent = "Talk";
  $("talk").setAttribute("aria-pressed", "false");
  setTalkNote("");
  showTalkState();
}

function closeMic() {
  if (!talk.mic) return;
  talk.mic.stream.getTracks().forEach((track) => track.stop());
  talk.mic.ctx.close();
  talk.mic = null;
}

function setTalkNote(text) { $("talk-note").textContent = text; }

// ---- the Talk button: a tap or click toggles hands-free listening; holding it (finger or mouse) talks while held
const HOLD_MS = 350;

function pressTalk(event) {
  talk.swallowClick = false;
  if (talk.mode || event.button > 0) return;
  talk.hold = setTimeout(() => { talk.hold = "held"; startTalking("push"); }, HOLD_MS);
}

function releaseTalk() {
  if (talk.hold === "held") {
    audioContext();  // a touch's pointerup is a user gesture (its pointerdown is not): playback unlocks here
    stopTalking();
    talk.swallowClick = true;  // the click that follows this release is not a tap
  } else {
    clearTimeout(talk.hold);
  }
  talk.hold = null;
}

$("talk").addEventListener("pointerdown", pressTalk);
document.addEventListener("pointerup", releaseTalk);  // wherever the finger or the mouse lets go
document.addEventListener("pointercancel", releaseTalk);
$("talk").addEventListener("contextmenu", (event) => event.preventDefault());  // a long press is no menu
$("talk").onclick = () => {
  if (talk.swallowClick) { talk.swallowClick = false; return; }
  if (talk.mode) stopTalking(); else startTalking("hands-free");
};
const typing = (event) => ["TEXTAREA", "INPUT", "SELECT"].includes(event.target.tagName);
document.addEventListener("keydown", (event) => {
  if (event.code !== "Space" || event.repeat || typing(event)) return;
  event.preventDefault();
  startTalking("push");
});
document.addEventListener("keyup", (event) => {
  if (event.code !== "Space" || typing(event) || talk.mode !== "push") return;
  event.preventDefault();
  stopTalking();
});
$("new-chat").onclick = () => {
  stopTalking();
  localStorage.removeItem("tts.session");
  $("chat").replaceChildren();
  talk.restored = true;
  state.ws.send(JSON.stringify({ type: "session" }));
  addNote("A new conversation.");
};

// The browser's language, when the server's speech recognition knows it (else the server detects it).
function browserLanguage() {
  const known = (state.info && state.info.conversation && state.info.conversation.languages) || [];
  const code = (navigator.language || "").split("-")[0].toLowerCase();
  return known.includes(code) ? code : null;
}
