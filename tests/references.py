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


def int8_kv_quantize(rows):
    """Rows [..., head_dim] -> (int8 values, float32 scales [...]): symmetric, max |x| / 127 per row
    (an all-zero row: scale 0, values 0); numpy's own rounding, written apart from the kernels."""
    rows = np.asarray(rows, np.float32)
    amax = np.abs(rows).max(axis=-1)
    inverse = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    values = np.clip(np.round(rows * inverse[..., None]), -127, 127).astype(np.int8)
    return values, (amax / np.float32(127.0)).astype(np.float32)


def int8_kv_pages(cache):
    """A float pool [n_pages, 2, P, H, D] -> the 8-bit pool [n_pages, page_bytes] int8 that holds it
    (voxc.artifact.Int8KvPage: the values in (k/v, row, head, element) order, padded, then the float32
    scales in (k/v, row, head) order).  A page that is all NaN (the reference's never-reached page)
    becomes all 0xFF bytes: values -1 and NaN scales, so a kernel that reads it still gives NaN."""
    from voxc.artifact import Int8KvPage

    n_pages, _, rows, heads, dim = cache.shape
    layout = Int8KvPage(rows, heads, dim)
    pool = np.zeros((n_pages, layout.page_bytes), np.int8)
    for page in range(n_pages):
        if np.isnan(cache[page]).all():
            pool[page] = -1
            continue
        values, scales = int8_kv_quantize(cache[page])
        pool[page, :values.size] = values.reshape(-1)
        first = layout.values_bytes
        pool[page, first:first + scales.size * 4] = scales.reshape(-1).view(np.int8)
    return pool


def int8_kv_floats(pool, rows, heads, dim):
    """The 8-bit pool [n_pages, page_bytes] -> float64 [n_pages, 2, rows, heads, dim]: values x scales."""
    from voxc.artifact import Int8KvPage

    layout = Int8KvPage(rows, heads, dim)
    count = 2 * rows * heads
    values = pool[:, :count * dim].reshape(-1, 2, rows, heads, dim).astype(np.float64)
    scales = np.ascontiguousarray(pool[:, layout.values_bytes:layout.values_bytes + 4 * count]).view(np.float32)
    return values * scales.reshape(-1, 2, rows, heads, 1).astype(np.float64)


def int8_ring_append_reference(pool, k, v, pages, starts, window, rows):
    """The 8-bit pool after the append of a chunk's last min(n, window) keys and values (each row
    quantized by :func:`int8_kv_quantize`), everything else unchanged."""
    from voxc.artifact import Int8KvPage

    heads, dim = k.shape[2], k.shape[3]
    layout = Int8KvPage(rows, heads, dim)
    after = pool.copy()
    scales = after[:, layout.values_bytes:layout.values_bytes + 8 * rows * heads].view(np.float32)
    n = k.shape[1]
    m = min(n, window)
    for bi in range(k.shape[0]):
        for i in range(m):
            row = (int(starts[bi]) + n - m + i) % window
            page = pages[bi, row // rows]
            for kv, chunk in enumerate((k, v)):
                values, scale = int8_kv_quantize(chunk[bi, n - m + i])
                for h in range(heads):
                    first = layout.value_offset(kv, row % rows, h, 0)
                    after[page, first:first + dim] = values[h]
                    scales[page, layout.scale_index(kv, row % rows, h) - layout.values_bytes // 4] = scale[h]
    return after


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
