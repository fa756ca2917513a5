"""Host-side mel framing: which PCM samples the compiled ``mel`` entry point gets, offline and streaming.

Kept free of TVM imports so the runtime (TVM's runtime libraries only, no compiler) can use it.
The graph side and the exact equivalence with transformers' extractor are described in
voxc.model.mel.
"""
from __future__ import annotations

import numpy as np

from voxc.errors import VoxcError
from voxc.config import AudioConfig


# ---- host-side framing ----------------------------------------------------------------------------------
def frame_count(n_samples: int, cfg: AudioConfig) -> int:
    """Mel frames the extractor gives offline (center=True) for ``n_samples`` of audio: ``n // hop``.

    (The centred STFT has ``n // hop + 1`` frames; the extractor drops the last.)
    """
    return n_samples // cfg.hop_length


def valid_frame_count(n_samples: int, cfg: AudioConfig) -> int:
    """Frames :class:`LogMel` returns for ``n_samples`` input samples: ``(n - window) // hop + 1``."""
    if n_samples < cfg.window_size:
        return 0
    return (n_samples - cfg.window_size) // cfg.hop_length + 1


def samples_for_frames(n_frames: int, cfg: AudioConfig) -> int:
    """Input length that makes :class:`LogMel` return exactly ``n_frames`` frames."""
    return (n_frames - 1) * cfg.hop_length + cfg.window_size


def offline_padded(audio: np.ndarray, cfg: AudioConfig) -> tuple[np.ndarray, int]:
    """Samples to pass to :class:`LogMel` for the extractor's offline (center=True) output.

    Returns ``(samples, n_frames)``: ``audio`` reflect-padded by window/2 on both sides (torch.stft's
    ``pad_mode="reflect"``, which does not repeat the edge sample) and cut just after the last frame the
    extractor keeps, so ``LogMel(samples)`` is exactly the extractor's ``[n_mels, n_frames]``,
    ``n_frames = len(audio) // hop``.
    """
    audio = _as_pcm(audio)
    half = cfg.window_size // 2
    if audio.shape[0] <= half:
        raise VoxcError(
            f"audio of {audio.shape[0]} samples is too short for the centred STFT: need more than {half}")
    n_frames = frame_count(audio.shape[0], cfg)
    padded = np.pad(audio, half, mode="reflect")
    return np.ascontiguousarray(padded[:samples_for_frames(n_frames, cfg)]), n_frames


def _as_pcm(chunk) -> np.ndarray:
    """Mono float PCM in [-1, 1] as float32 (the extractor casts to float32 before anything else)."""
    if type(chunk) is np.ndarray and chunk.dtype == np.float32 and chunk.ndim == 1:
        return chunk          # what a session passes on every chunk: nothing to check or convert
    pcm = np.asarray(chunk)
    if pcm.ndim != 1:
        raise VoxcError(f"expected mono PCM as a 1-D array, got shape {pcm.shape}")
    if pcm.size and not np.issubdtype(pcm.dtype, np.floating):
        raise VoxcError(f"expected float PCM in [-1, 1], got dtype {pcm.dtype} (scale integer PCM first)")
    return pcm.astype(np.float32, copy=False)


class StreamingMelFramer:
    """Cuts a PCM stream into LogMel input windows, so that streaming frames equal the offline ones.

    ``push(chunk)`` takes any number of samples and returns ``None`` or one window of
    ``samples_for_frames(k * frames_per_step)`` samples (``k >= 1``, as many steps as are complete), which
    LogMel turns into the next ``k * frames_per_step`` frames. Consecutive windows overlap by
    ``window - hop`` samples. ``flush()`` ends the stream and returns the window of the remaining frames
    (possibly fewer than a step, or ``None``).

    Equivalence: all windows' frames, concatenated, equal the extractor's offline (center=True) output on
    the whole stream, ``len(stream) // hop`` frames, for ANY stream. That includes its reflect padding:

    * Start: offline frame 0 reads the window/2 samples ``stream[window/2 : 0 : -1]`` (reflected, edge
      excluded) followed by the stream. The framer therefore holds the first ``window/2 + 1`` samples before
      it emits anything, then prepends that reflection. In Voxtral's pipeline the stream starts with the
      32 x 1280 zero samples of left padding, so the reflection is zeros there; it is still computed, so
      the equivalence does not depend on it.
    * Middle: frame ``j`` needs stream samples up to ``j*hop + window/2``; it is emitted as soon as they
      have arrived (rounded down to whole steps). Such a frame is never one the extractor drops.
    * End: only ``flush()`` knows where the stream ends; it appends the reflection of the last samples and
      emits the frames up to ``len(stream) // hop`` (the extractor drops the final centred frame).
    """

    def __init__(self, cfg: AudioConfig, frames_per_step: int | None = None):
        self.cfg = cfg
        self.frames_per_step = cfg.mel_frames_per_token if frames_per_step is None else frames_per_step
        if self.frames_per_step < 1:
            raise VoxcError(f"frames_per_step must be positive, got {self.frames_per_step}")
        self._half = cfg.window_size // 2
        self._pending = np.zeros(0, np.float32)   # padded stream from the next frame's first sample on
        self._started = False                     # left reflection prepended to _pending yet?
        self._tail = np.zeros(0, np.float32)      # last window/2 + 1 stream samples, for the end reflection
        self.samples_received = 0
        self.frames_emitted = 0
        self.finished = False

    def push(self, chunk) -> np.ndarray | None:
        if self.finished:
            raise VoxcError("StreamingMelFramer: push() after flush()")
        pcm = _as_pcm(chunk)
        if pcm.size == 0:
            return None
        self.samples_received += pcm.shape[0]
        keep = self._half + 1
        self._tail = pcm[-keep:] if pcm.shape[0] >= keep else np.concatenate([self._tail, pcm])[-keep:]
        self._pending = np.concatenate([self._pending, pcm])
        if not self._started:
            if self._pending.shape[0] <= self._half:
                return None
            self._pending = np.concatenate([self._pending[self._half:0:-1], self._pending])
            self._started = True
        ready = valid_frame_count(self._pending.shape[0], self.cfg)
        return self._take((ready // self.frames_per_step) * self.frames_per_step)

    def flush(self) -> np.ndarray | None:
        """End of stream: the window of all frames not yet emitted (``None`` if there are none)."""
        if self.finished:
            raise VoxcError("StreamingMelFramer: flush() called twice")
        self.finished = True
        if not self._started:
            raise VoxcError(
                f"stream of {self.samples_received} samples is too short for the centred STFT: "
                f"need more than {self._half}")
        end_reflection = self._tail[-2::-1][:self._half]
        self._pending = np.concatenate([self._pending, end_reflection])
        return self._take(frame_count(self.samples_received, self.cfg) - self.frames_emitted)

    def _take(self, n_frames: int) -> np.ndarray | None:
        if n_frames <= 0:
            return None
        window = self._pending[:samples_for_frames(n_frames, self.cfg)].copy()
        self._pending = self._pending[n_frames * self.cfg.hop_length:]
        self.frames_emitted += n_frames
        return window
