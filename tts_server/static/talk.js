// Voice chat: the microphone streams the user's turns (hands-free, ended by the server's VAD, or press-to-talk
// with the space bar), the chat model's answer is shown as it is written and spoken as it comes, the user's voice
// cuts the answer off (barge-in), and the conversation (a server session) survives a reload.
"use strict";

const talk = { mic: null, mode: null, restored: false, listening: null, answerSpeaker: 0 };
stats.talk = { saved: [], replyText: 0, speechStarts: 0, bargeIns: [], firstAudioAt: {}, restored: 0 };
window.__tts.talk = talk;

function canChat() { return !!(state.info && state.info.conversation && state.info.conversation.chat); }
function userSpeaker() { return Number($("speaker").value || 0) === 0 ? 1 : 0; }

// ---- the server's voice-chat messages ------------------------------------------------------------------------
function talkReply(msg) {
  switch (msg.status) {
    case "session":
      localStorage.setItem("tts.session", msg.session);
      if (msg.turns > 0 && !talk.restored) showTranscript(msg.session);
      talk.restored = true;
      return true;
    case "speech_start":
      stats.talk.speechStarts++;
      setTalkNote("listening…");
      bargeIn();
      return true;
    case "speech_end":
      setTalkNote("transcribing…");
      return true;
    case "turn_saved":  // its id is the page's own: msg.turns stops growing once the history is full
      stats.talk.saved.push(msg);
      addTurn({ id: `said-${state.seq++}`, text: msg.text, speaker: msg.speaker, role: "user" }).status = "said";
      setTalkNote(talk.mode ? "listening…" : "");
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
    if (talk.mode && state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(event.data);
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
  showError("");
  talk.answerSpeaker = Number($("speaker").value || 0);
  const request = { type: "turn_start", speaker: userSpeaker(), sample_rate: talk.mic.ctx.sampleRate,
                    vad: mode === "hands-free" };
  if (canChat()) request.respond = { speaker: talk.answerSpeaker, timestamps: $("highlight").checked };
  state.ws.send(JSON.stringify(request));
  $("talk").textContent = mode === "hands-free" ? "Stop talking" : "Talking…";
  $("talk").setAttribute("aria-pressed", "true");
  setTalkNote(mode === "hands-free" ? "listening…" : "speak, then let go of the space bar");
  if (mode === "push") bargeIn();  // pressing to talk interrupts the answer at once
}

function stopTalking() {
  if (!talk.mode) return;
  talk.mode = null;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "turn_end" }));
  if (talk.mic) {
    talk.mic.stream.getTracks().forEach((track) => track.stop());
    talk.mic.ctx.close();
    talk.mic = null;
  }
  $("talk").textContent = "Talk";
  $("talk").setAttribute("aria-pressed", "false");
  setTalkNote("");
}

function setTalkNote(text) { $("talk-note").textContent = text; }

$("talk").onclick = () => (talk.mode ? stopTalking() : startTalking("hands-free"));
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
