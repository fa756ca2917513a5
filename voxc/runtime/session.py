"""Realtime transcription streams: PCM chunks in, text deltas out, many streams batched together.

The same session serves offline transcription (all audio in one ``feed``), so there is one
pipeline, and it reproduces the reference's offline layout exactly:

* the stream starts with ``left_pad_tokens`` tokens of silence (32 in the reference; Q4_0 uses 76);
* the decoder prompt is ``[BOS] + [STREAMING_PAD] * (left_pad + delay)``, each position summed
  with its audio embedding;
* after the prompt, each step feeds back the previous token plus the next audio embedding;
* ``finish()`` pads the audio to a whole token plus ``delay + 1 + 10`` tokens of silence, as
  mistral-common does, and the sequence ends one position before the audio does (or at EOS).

State kept across calls: the mel framer's PCM overlap on the host; on the device, in this
stream's slot, the conv stem's context, the encoder and decoder ring caches and the audio
embeddings not yet consumed by the decoder.

:func:`advance` runs the pending work of any number of streams together: one batched mel+encode
call per group of equal-length windows and one batched decode call for all streams past their
prompt.  ``feed`` on a single stream is that with a batch of one; a server queues the chunks of
all its streams with :meth:`StreamingSession.queue` and calls :func:`advance` once per tick.

A session runs for as long as audio comes: it keeps only the last :data:`TOKEN_HISTORY` tokens in
``tokens`` (``token_count`` counts them all), so an hours-long stream does not grow.  Text leaves
with the decoder position of the token that completed it (:meth:`StreamingSession.take_pieces`),
from which a server derives timestamps (``voxc.server.timestamps``).
"""
from __future__ import annotations

import os
from collections import defaultdict, deque

import numpy as np

from voxc.artifact import MAX_TOKENS_PER_ENCODE, RIGHT_PAD_BUFFER_TOKENS, check_left_pad_tokens
from voxc.errors import VoxcError
from voxc.runtime.framing import StreamingMelFramer

# Tokens a session keeps in ``tokens`` (409 s of audio at 80 ms a token): tests compare the whole
# list for short clips; a stream that runs for hours keeps its memory flat.
TOKEN_HISTORY = 4096


class StreamingSession:
    def __init__(self, model, *, delay_ms: int, left_pad_tokens: int, record_logits: bool = False):
        self.model = model
        cfg = model.config
        self.audio_cfg = cfg.audio
        self.samples_per_token = cfg.audio.samples_per_token
        self.delay = model.delay_tokens(delay_ms)
        self.left_pad_tokens = check_left_pad_tokens(left_pad_tokens)
        tok = model.tokenizer
        self.prompt = [tok.bos_id] + [tok.streaming_pad_id] * (left_pad_tokens + self.delay)
        self.eos_id = tok.eos_id
        self.text = tok.incremental_decoder()
        self.record_logits = record_logits
        self.logits: list[np.ndarray] = []
        self.tokens: list[int] = []     # the last TOKEN_HISTORY tokens emitted
        self.token_count = 0             # all tokens emitted (EOS included)

        self.slot = model.slots.acquire()
        model.reset_slot(self.slot, self.delay)
        self._framer = StreamingMelFramer(cfg.audio, frames_per_step=cfg.audio.mel_frames_per_token)
        self._windows: deque[np.ndarray] = deque()   # framed PCM waiting for the encoder
        self._pending_text: list[tuple[str, int]] = []   # (text, decoder position that emitted it)
        self._encoder_frames = 0         # encoder positions consumed so far
        self._audio_tokens = 0           # audio embeddings in this stream's ring so far
        self._position = 0               # next decoder position
        self._last_token: int | None = None
        self._samples_fed = 0
        self._final_tokens: int | None = None   # total audio tokens, known at finish()
        self._ended = False              # EOS seen
        self.finished = False
        self.queue(np.zeros(left_pad_tokens * self.samples_per_token, np.float32), _padding=True)

    # ---- public API -------------------------------------------------------------------------
    def feed(self, pcm) -> str:
        """Add 16 kHz mono float PCM (any length); returns the text decoded since the last call."""
        self.queue(pcm)
        advance([self])
        return self.take_text()

    def finish(self) -> str:
        """End of audio: flush the tail and return the remaining text."""
        if self.finished:
            raise VoxcError("finish() was already called on this stream")
        if self._final_tokens is None:
            self.end()
        advance([self])
        self.finished = True
        self.model.slots.release(self.slot)
        return self.take_text() + self.text.flush()

    def queue(self, pcm, _padding: bool = False) -> None:
        """Add PCM without computing anything yet (a server calls :func:`advance` for all its streams)."""
        if self.finished or self._final_tokens is not None:
            raise VoxcError("this stream is finished; start a new one with model.stream()")
        pcm = np.zeros(0, np.float32) if pcm is None else check_pcm(pcm)
        if not _padding:
            self._samples_fed += pcm.shape[0]
        step = MAX_TOKENS_PER_ENCODE * self.samples_per_token
        for begin in range(0, pcm.shape[0], step):
            window = self._framer.push(pcm[begin:begin + step])
            if window is not None:
                self._windows.append(window)

    def end(self) -> None:
        """Mark the end of audio: queue the right padding and the framer's tail (no compute yet).
        ``finish()`` does this itself; a server calls it to batch the last steps of many streams."""
        spt = self.samples_per_token
        right_pad = (-self._samples_fed) % spt + (self.delay + 1 + RIGHT_PAD_BUFFER_TOKENS) * spt
        self.queue(np.zeros(right_pad, np.float32), _padding=True)
        self._final_tokens = (self.left_pad_tokens * spt + self._samples_fed + right_pad) // spt
        window = self._framer.flush()
        if window is not None:
            self._windows.append(window)

    def take_text(self) -> str:
        return "".join(text for text, _ in self.take_pieces())

    def take_pieces(self) -> list[tuple[str, int]]:
        """The text decoded since the last take, as ``(text, position)`` per token that completed some:
        ``position`` is the decoder position whose output the token was (the first text token comes
        from position ``len(prompt) - 1``).  Tokens that complete no text (control tokens, the first
        bytes of a multi-byte character) are left out; their bytes arrive with a later piece."""
        pieces, self._pending_text = self._pending_text, []
        return pieces

    @property
    def samples_fed(self) -> int:
        """Samples of audio queued so far (without the silence padding)."""
        return self._samples_fed

    def drop(self) -> None:
        """End the stream without computing its tail (its client is gone): frees its cache slot.
        A finished or dropped stream is left as it is."""
        if not self.finished:
            self.finished = True
            self.model.slots.release(self.slot)

    def __del__(self):
        if not getattr(self, "finished", True) and hasattr(self, "slot"):
            self.drop()

    # ---- scheduling (used by advance) ---------------------------------------------------------
    def _next_window_tokens(self) -> int:
        """Tokens the next queued window adds, or 0 if it must wait (nothing queued, or no ring room)."""
        if not self._windows:
            return 0
        tokens = (len(self._windows[0]) - self.audio_cfg.window_size) // self.audio_cfg.hop_length + 1
        tokens //= self.audio_cfg.mel_frames_per_token
        if self._audio_tokens + tokens - self._position > self.model.audio_ring_rows:
            return 0
        return tokens

    def _decode_limit(self) -> int:
        """Positions below this can be decoded now; the reference's sequence ends at N - 1."""
        if self._ended:
            return self._position
        if self._final_tokens is None:
            return self._audio_tokens
        return min(self._audio_tokens, self._final_tokens - 1)

    def _decode_input(self) -> tuple[list[int], int]:
        """Tokens to decode next and how many positions they cover (a prompt run, or one step)."""
        p, prompt_len = self._position, len(self.prompt)
        if p < prompt_len:
            run = min(prompt_len, self._decode_limit()) - p
            return self.prompt[p:p + run], run
        return [self._last_token], 1

    def _accept(self, run: int, logits_row, token: int) -> None:
        self._position += run
        if self._position < len(self.prompt):
            return
        if self.record_logits:
            self.logits.append(logits_row())
        self.tokens.append(token)
        if len(self.tokens) > TOKEN_HISTORY:
            del self.tokens[0]
        self.token_count += 1
        self._last_token = token
        if token == self.eos_id:
            self._ended = True
        else:
            text = self.text.push(token)
            if text:
                self._pending_text.append((text, self._position - 1))


def advance(sessions: list[StreamingSession]) -> None:
    """Run all queued work of ``sessions`` (same model): batched encodes, then batched decodes, until idle."""
    if not sessions:
        return
    model = sessions[0].model
    while True:
        progressed = _encode_ready(model, sessions)
        progressed |= _decode_ready(model, sessions)
        if not progressed:
            return


def _encode_ready(model, sessions) -> bool:
    groups = defaultdict(list)
    for session in sessions:
        if session._next_window_tokens():
            groups[len(session._windows[0])].append(session)
    for group in groups.values():
        windows = np.stack([s._windows[0] for s in group])
        mel = model.mel(windows)
        frames = mel.shape[2] // sessions[0].audio_cfg.conv_stride
        # a step that raises (no KV pages for some stream: KvCacheFull) leaves every stream's window queued
        model.encode(mel, [s.slot for s in group], [s._encoder_frames for s in group])
        for s in group:
            s._windows.popleft()
            s._encoder_frames += frames
            s._audio_tokens += frames // s.audio_cfg.downsample_factor
    return bool(groups)


def _decode_ready(model, sessions) -> bool:
    ready = [s for s in sessions if s._position < s._decode_limit()]
    # Streams decode runs of equal length together: the one-token steps of every stream past its
    # prompt, and the prompt runs of streams that start together (a server whose clients join at
    # once decoded each prompt alone, one 39-token step per client in a single tick).
    by_run = defaultdict(list)
    for s in ready:
        tokens, run = s._decode_input()
        by_run[len(tokens)].append((s, (tokens, run)))
    for group in by_run.values():
        batch, inputs = zip(*group)
        logits, next_tokens = model.decode(
            [tokens for tokens, _ in inputs], [s.slot for s in batch], [s._position for s in batch])
        tokens = model.rt.numpy(next_tokens)
        all_logits = []

        def logits_row(i):
            if not all_logits:
                all_logits.append(model.rt.numpy(logits))
            return all_logits[0][i]

        for i, (s, (_, run)) in enumerate(zip(batch, inputs)):
            s._accept(run, lambda i=i: logits_row(i), int(tokens[i]))
    return bool(ready)


def check_pcm(pcm) -> np.ndarray:
    if isinstance(pcm, (str, bytes, os.PathLike)):
        raise VoxcError(f"feed() and transcribe() take PCM samples, not a file name ({pcm!r}); read the file with "
                        f"voxc.audio.load_audio(path), which also resamples it to 16 kHz mono")
    array = np.asarray(pcm)
    if array.ndim != 1:
        raise VoxcError(f"feed() takes mono PCM as a 1-D array, got shape {array.shape}")
    if array.dtype.kind == "i":
        raise VoxcError("feed() takes float PCM in [-1, 1]; convert int16 with pcm / 32768")
    if array.dtype.kind != "f":
        raise VoxcError(f"feed() takes float PCM, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise VoxcError("audio chunk contains NaN or infinite samples")
    return array
