"""One realtime transcription stream: PCM chunks in, text deltas out.

The same session serves offline transcription (all audio in one ``feed``), so there is one
pipeline, and it reproduces the reference's offline layout exactly:

* the stream starts with ``left_pad_tokens`` tokens of silence (32 in the reference; Q4_0 uses 76);
* the decoder prompt is ``[BOS] + [STREAMING_PAD] * (left_pad + delay)``, each position summed
  with its audio embedding;
* after the prompt, each step feeds back the previous token plus the next audio embedding;
* ``finish()`` pads the audio to a whole token plus ``delay + 1 + 10`` tokens of silence, as
  mistral-common does, and the sequence ends one position before the audio does (or at EOS).

State kept across calls, all on the device except the PCM overlap: the mel framer's overlap, the
conv stem's carried frames, the encoder and decoder ring caches (this session's slot), and the
audio embeddings not yet consumed by the decoder.
"""
from __future__ import annotations

import numpy as np

from voxc.errors import VoxcError
from voxc.model.mel import StreamingMelFramer

# mistral-common's OFFLINE_STREAMING_BUFFER_TOKENS: right padding beyond delay + BOS, so a word
# spoken at the very end still gets its tokens.
RIGHT_PAD_BUFFER_TOKENS = 10
# Longest encoder call, in text tokens: bounds the attention scratch memory of a long feed().
MAX_TOKENS_PER_ENCODE = 32


class StreamingSession:
    def __init__(self, model, *, delay_ms: int, left_pad_tokens: int, record_logits: bool = False):
        self.model = model
        cfg = model.config
        self.audio_cfg = cfg.audio
        self.samples_per_token = cfg.audio.samples_per_token
        self.delay = model.delay_tokens(delay_ms)
        if left_pad_tokens < 0:
            raise VoxcError(f"left_pad_tokens must be >= 0, got {left_pad_tokens}")
        self.left_pad_tokens = left_pad_tokens
        tok = model.tokenizer
        self.prompt = [tok.bos_id] + [tok.streaming_pad_id] * (left_pad_tokens + self.delay)
        self.eos_id = tok.eos_id
        self.text = tok.incremental_decoder()
        self.record_logits = record_logits
        self.logits: list[np.ndarray] = []
        self.tokens: list[int] = []

        self.slot = model.slots.acquire()
        model.reset_slot(self.slot)
        self._slots = np.array([self.slot], np.int32)
        self._framer = StreamingMelFramer(cfg.audio, frames_per_step=cfg.audio.mel_frames_per_token)
        self._encoder_frames = 0         # encoder positions consumed so far
        self._audio_tokens = 0           # audio embeddings in this stream's ring so far
        self._position = 0               # next decoder position
        self._last_token: int | None = None
        self._samples_fed = 0
        self._ended = False              # EOS seen or finish() done
        self.finished = False
        self._push(np.zeros(left_pad_tokens * self.samples_per_token, np.float32))

    # ---- public API -------------------------------------------------------------------------
    def feed(self, pcm) -> str:
        """Add 16 kHz mono float PCM (any length); returns the text decoded since the last call."""
        if self.finished:
            raise VoxcError("this stream is finished; start a new one with model.stream()")
        pcm = _check_pcm(pcm)
        self._samples_fed += pcm.shape[0]
        return self._push(pcm)

    def finish(self) -> str:
        """End of audio: flush the tail and return the remaining text."""
        if self.finished:
            raise VoxcError("finish() was already called on this stream")
        spt = self.samples_per_token
        to_whole_token = (-self._samples_fed) % spt
        right_pad = to_whole_token + (self.delay + 1 + RIGHT_PAD_BUFFER_TOKENS) * spt
        total_tokens = (self.left_pad_tokens * spt + self._samples_fed + right_pad) // spt
        text = self._push(np.zeros(right_pad, np.float32), final_tokens=total_tokens)
        window = self._framer.flush()
        if window is not None:
            self._encode(window)
        assert self._audio_tokens == total_tokens
        text += self._advance(final_tokens=total_tokens)
        self.finished = True
        self.model.slots.release(self.slot)
        return text + self.text.flush()

    def __del__(self):
        if not getattr(self, "finished", True) and hasattr(self, "slot"):
            self.model.slots.release(self.slot)

    # ---- audio side -------------------------------------------------------------------------
    def _push(self, pcm: np.ndarray, final_tokens: int | None = None):
        """Frame, encode and decode ``pcm`` in pieces, so the encoder never runs further ahead of the
        decoder than the audio ring holds."""
        step = MAX_TOKENS_PER_ENCODE * self.samples_per_token
        out = []
        for begin in range(0, pcm.shape[0], step):
            window = self._framer.push(pcm[begin:begin + step])
            if window is not None:
                self._encode(window)
                out.append(self._advance(final_tokens))
        return "".join(out)

    def _encode(self, window: np.ndarray):
        model = self.model
        mel = model.mel(window)
        frames = mel.shape[2] // self.audio_cfg.conv_stride
        model.encode(mel, self._slots, np.array([self._encoder_frames], np.int32))
        self._encoder_frames += frames
        self._audio_tokens += frames // self.audio_cfg.downsample_factor
        if self._audio_tokens - self._position > self.model.audio_ring_rows:
            raise AssertionError("encoder ran past the audio ring; MAX_TOKENS_PER_ENCODE is too large")

    # ---- text side --------------------------------------------------------------------------
    def _advance(self, final_tokens: int | None) -> str:
        """Run the decoder over every position whose audio is here.

        ``final_tokens`` (at finish) is the total number of audio tokens N; the reference's
        sequence is then N long, so the last position fed is N - 2.
        """
        out = []
        prompt_len = len(self.prompt)
        limit = self._audio_tokens if final_tokens is None else min(self._audio_tokens, final_tokens - 1)
        while not self._ended and self._position < limit:
            p = self._position
            if p < prompt_len:
                run = min(prompt_len, limit) - p
                tokens = self.prompt[p:p + run]
            else:
                run, tokens = 1, [self._last_token]
            logits, next_token = self.model.decode(
                np.array([tokens], np.int32), np.array([self.delay], np.float32), self._slots,
                np.array([p], np.int32))
            self._position += run
            if self._position < prompt_len:
                continue
            token = int(self.model.rt.numpy(next_token)[0])
            if self.record_logits:
                self.logits.append(self.model.rt.numpy(logits)[0])
            self.tokens.append(token)
            self._last_token = token
            if token == self.eos_id:
                self._ended = True
                break
            out.append(self.text.push(token))
        return "".join(out)


def _check_pcm(pcm) -> np.ndarray:
    array = np.asarray(pcm)
    if array.ndim != 1:
        raise VoxcError(f"feed() takes mono PCM as a 1-D array, got shape {array.shape}")
    if array.dtype.kind == "i":
        raise VoxcError("feed() takes float PCM in [-1, 1]; convert int16 with pcm / 32768")
    if array.dtype.kind != "f":
        raise VoxcError(f"feed() takes float PCM, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise VoxcError("audio chunk contains NaN or infinite samples")
    return array
