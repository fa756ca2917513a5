// AudioWorklet processor for voxc's microphone capture: averages the input channels to mono and
// posts Float32Array blocks of `blockFrames` samples (at the AudioContext's rate) to the page,
// which resamples them to 16 kHz (voxc.js Resampler) and feeds the stream.
class VoxcCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.blockFrames = options?.processorOptions?.blockFrames ?? 2048;
    this.buffer = new Float32Array(this.blockFrames);
    this.filled = 0;
    this.port.onmessage = (e) => {
      if (e.data === "flush" && this.filled) {
        this.port.postMessage(this.buffer.slice(0, this.filled));
        this.filled = 0;
      }
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < channels.length; c++) s += channels[c][i];
      this.buffer[this.filled++] = s / channels.length;
      if (this.filled === this.blockFrames) {
        this.port.postMessage(this.buffer.slice());
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("voxc-capture", VoxcCapture);
