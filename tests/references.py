"""What several tests share, written once: the float64 ring-attention reference (also used by
tests/gpu_attention_check.py and bench/device/tiny_check.py; bench/device/pack.sh ships this file)
and the session runner that records a stream's tokens and logits."""
from __future__ import annotations

import numpy as np


def ring_attention_reference(q, k, v, cache, pages, starts, window):
    """float64 attention of each query over its visible ring rows and chunk keys (``cache``: one layer's
    pool of pages [n_pages, 2, page_rows, kv_heads, head_dim]; ``pages`` [b, pages_per_ring]: each
    sequence's page table row, ring row r in row r % page_rows of page pages[bi, r // page_rows]), and
    the pool after the append (the chunk's last min(n, window) keys/values at ring rows
    (start + i) mod window).  Only visible rows are read: rows of pages a sequence has not reached may
    hold anything."""
    b, n, heads, d = q.shape
    page_rows = cache.shape[2]
    group = heads // k.shape[2]
    q, k, v, c = (a.astype(np.float64) for a in (q, k, v, cache))
    out = np.zeros(q.shape)

    def ring(bi, kv, pos):
        rows = pos % window
        return c[pages[bi, rows // page_rows], kv, rows % page_rows]

    for bi in range(b):
        s = int(starts[bi])
        for i in range(n):
            pos = np.arange(max(0, s + i - window + 1), s + i + 1)
            ring_pos, chunk_pos = pos[pos < s], pos[pos >= s]
            for h in range(heads):
                kh = h // group
                keys = np.concatenate([ring(bi, 0, ring_pos)[:, kh], k[bi, chunk_pos - s, kh]])
                vals = np.concatenate([ring(bi, 1, ring_pos)[:, kh], v[bi, chunk_pos - s, kh]])
                scores = keys @ q[bi, i, h] * d ** -0.5
                w = np.exp(scores - scores.max())
                out[bi, i, h] = (w / w.sum()) @ vals
    after = cache.copy()
    m = min(n, window)
    for bi in range(b):
        for i in range(m):
            row = (int(starts[bi]) + n - m + i) % window
            page = pages[bi, row // page_rows]
            after[page, 0, row % page_rows] = k[bi, n - m + i]
            after[page, 1, row % page_rows] = v[bi, n - m + i]
    return out, after


def paged_ring(rng, starts, n, window, page_rows, kv_heads, head_dim, dtype, garbage=np.nan):
    """A random pool and page-table rows for sequences at ``starts`` about to take a chunk of ``n``:
    each sequence's pages for the ring rows it will have reached after the chunk, distinct and shuffled
    over the pool; the table entries of rows it never reaches point at page 0, filled with ``garbage``
    (NaN: a kernel that lets such a row weigh in gives NaN), as the runtime leaves them.  Returns
    (cache [n_pages, 2, page_rows, kv_heads, head_dim], pages [b, pages_per_ring] int32)."""
    per_ring = -(-window // page_rows)
    b = len(starts)
    n_pages = b * per_ring + 2            # page 0 and a spare one no sequence uses
    pages = (rng.permutation(n_pages - 1)[:b * per_ring] + 1).reshape(b, per_ring).astype(np.int32)
    for bi, s in enumerate(starts):
        reached = -(-min(int(s) + n, window) // page_rows)
        pages[bi, reached:] = 0
    cache = rng.standard_normal((n_pages, 2, page_rows, kv_heads, head_dim)).astype(dtype)
    cache[0] = garbage
    return cache, pages


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
