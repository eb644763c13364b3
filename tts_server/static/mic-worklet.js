// The microphone as 16-bit PCM: the audio thread gathers 40 ms of samples at the context's rate, converts them,
// and hands each piece to the page, which sends it as one binary WebSocket frame.
class PcmSender extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate * 0.04);
    this.piece = new Int16Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.piece[this.filled++] = Math.round(s * 32767);
        if (this.filled === this.piece.length) {
          this.port.postMessage(this.piece.buffer, [this.piece.buffer]);  // handed over: a new piece follows
          this.piece = new Int16Array(this.size);
          this.filled = 0;
        }
      }
    }
    return true;  // keep running while the microphone is open
  }
}

registerProcessor("pcm-sender", PcmSender);
