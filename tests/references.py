"""What several tests share, written once: the float64 ring-attention reference (also used by
tests/gpu_attention_check.py and bench/device/tiny_check.py; bench/device/pack.sh ships this file)
and the session runner that records a stream's tokens and logits."""
from __future__ import annotations

import numpy as np


def ring_attention_reference(q, k, v, cache, slots, starts, window):
    """float64 attention of each query over its visible ring rows and chunk keys (``cache``: one layer's
    ring, [2, slots, window, kv_heads, head_dim]), and the cache after
    the append (the chunk's last min(n, window) keys/values at ring rows (start + i) mod window)."""
    b, n, heads, d = q.shape
    group = heads // k.shape[2]
    q, k, v, c = (a.astype(np.float64) for a in (q, k, v, cache))
    out = np.zeros(q.shape)
    for bi in range(b):
        s = int(starts[bi])
        for i in range(n):
            pos = np.arange(max(0, s + i - window + 1), s + i + 1)
            ring = pos < s
            for h in range(heads):
                kh = h // group
                keys = np.where(ring[:, None], c[0, slots[bi], pos % window, kh], k[bi, np.clip(pos - s, 0, n - 1), kh])
                vals = np.where(ring[:, None], c[1, slots[bi], pos % window, kh], v[bi, np.clip(pos - s, 0, n - 1), kh])
                scores = keys @ q[bi, i, h] * d ** -0.5
                w = np.exp(scores - scores.max())
                out[bi, i, h] = (w / w.sum()) @ vals
    after = cache.copy()
    m = min(n, window)
    for bi in range(b):
        for i in range(m):
            row = (int(starts[bi]) + n - m + i) % window
            after[0, slots[bi], row] = k[bi, n - m + i]
            after[1, slots[bi], row] = v[bi, n - m + i]
    return out, after


def run_ticks(model, audios, tick: int = 1280, delays_ms=None):
    """A server's path for one stream per clip of ``audios`` (with its delay of ``delays_ms``, default
    the model's): at each tick every stream's next ``tick`` samples are queued and all streams advance
    in one batched step (voxc.runtime.session.advance); then every stream is ended and advanced once
    more.  Returns the sessions, logits recorded, not finished."""
    from voxc.runtime.session import advance

    sessions = [model.stream(delay_ms) for delay_ms in (delays_ms or [None] * len(audios))]
    for s in sessions:
        s.record_logits = True
    for begin in range(0, max(len(a) for a in audios), tick):
        for s, a in zip(sessions, audios):
            if begin < len(a):
                s.queue(a[begin:begin + tick])
        advance(sessions)
    for s in sessions:
        s.end()
    advance(sessions)
    return sessions


def run_stream(model, audio, *, delay_ms=None, chunk=None):
    """``(text, tokens, logits)`` of one stream fed ``audio`` whole, in chunks of ``chunk`` samples,
    or in the chunk sizes of a list (whose sum covers the audio)."""
    session = model.stream(delay_ms)
    session.record_logits = True
    if chunk is None:
        sizes = [len(audio)]
    elif isinstance(chunk, int):
        sizes = [chunk] * (-(-len(audio) // chunk))
    else:
        sizes = list(chunk)
    text, begin = [], 0
    for size in sizes:
        text.append(session.feed(audio[begin:begin + size]))
        begin += size
    assert begin >= len(audio)
    text.append(session.finish())
    return "".join(text), np.array(session.tokens), np.array(session.logits)


def q4k_config():
    """Every input width a multiple of 256 (Q4_K's super-block), the tiny tokenizer's vocabulary,
    windows shorter than the clip (encoder 8, decoder 16: the rings wrap)."""
    from voxc.config import AudioConfig, DecoderConfig, EncoderConfig, ModelConfig
    from voxc.tokenizer import TINY_VOCAB_SIZE

    return ModelConfig(
        EncoderConfig(dim=256, n_layers=1, n_heads=4, head_dim=64, hidden_dim=512, sliding_window=8),
        DecoderConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512,
                      sliding_window=16, vocab_size=TINY_VOCAB_SIZE),
        AudioConfig()).validate()
