"""The llvm target's ring-attention kernel against a float64 numpy reference of the sliding window
(ring rows through the page table + the chunk's own keys), and against the TE definition every target
starts from.  Pages of every size from one row to the whole window, windows that are not a multiple of
the page size, and table entries of unreached rows pointing at a page of NaNs (which must not leak)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from references import paged_ring, ring_attention_reference  # noqa: E402
from schedules.ring_attention import ring_attention_cpu, ring_attention_func  # noqa: E402


def reference(q, k, v, cache, pages, starts, window):
    return ring_attention_reference(q, k, v, cache, pages, starts, window)[0]


def _run(func, arrays, out_shape, dtype):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=tvm.target.Target("llvm"))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


CASES = [  # heads, kv heads, head dim, window, page rows, n, starts, dtype
    (8, 2, 64, 16, 5, 1, [0, 5, 15, 16, 40], "float32"),    # decode: empty ring, partial, full, wrapped
    (4, 4, 32, 8, 3, 7, [0, 3, 30], "float32"),             # encoder-like chunk, ring wraps inside it
    (6, 2, 48, 5, 2, 12, [2, 9], "float32"),                 # chunk longer than the window, odd sizes
    (8, 1, 64, 64, 16, 3, [100, 1], "float32"),              # one kv head for all queries
    (8, 2, 64, 16, 16, 3, [0, 21], "float16"),               # half storage, float32 math, one page
    (12, 4, 40, 6, 4, 1, [0, 3, 6, 13], "float32"),          # 3 heads per kv head, 8-lane head_dim
    (7, 1, 16, 3, 1, 2, [0, 7], "float32"),                  # MQA with an odd head count, one-row pages
    (5, 5, 8, 1, 1, 3, [0, 4], "float16"),                   # a one-position window
    (4, 2, 32, 37, 8, 5, [0, 30, 33, 90], "float32"),        # 5 pages, the last of 5 rows
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,page_rows,n,starts,dtype", CASES)
def test_cpu_ring_attention_equals_the_window_definition(heads, kv_heads, head_dim, window, page_rows, n, starts,
                                                         dtype):
    rng = np.random.default_rng(heads * 100 + window)
    b = len(starts)
    q = rng.standard_normal((b, n, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((b, n, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((b, n, kv_heads, head_dim)).astype(dtype)
    cache, pages = paged_ring(rng, starts, n, window, page_rows, kv_heads, head_dim, dtype)
    arrays = (q, k, v, cache, pages, np.array(starts, np.int32))
    want = reference(*arrays, window)
    # small key blocks, runs and query tiles: a few keys already take every path (several blocks and
    # runs per tile, runs that cross pages, wrap around the ring or reach into the chunk, a partial last tile)
    got = _run(ring_attention_cpu(heads, kv_heads, head_dim, window, dtype, page_rows=page_rows, keys_per_block=4,
                                  min_keys_per_run=2, query_tile=3), arrays, q.shape, dtype)
    tol = 2e-3 if dtype == "float16" else 1e-5
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    if dtype == "float32":
        te = _run(ring_attention_func(heads, kv_heads, head_dim, window, dtype, page_rows=page_rows), arrays, q.shape,
                  dtype)
        assert np.isfinite(te).all()
        assert np.abs(got - te).max() / np.abs(te).max() < 1e-5


def test_llvm_target_swaps_in_the_cpu_kernel():
    from targets import llvm
    from voxc.config import ModelConfig
    from voxc.model.export import export_graph

    mod, _ = export_graph(ModelConfig.tiny(), llvm.TARGET.graph_options())
    swapped = llvm.apply_cpu_attention(mod)
    funcs = {gv.name_hint: f for gv, f in swapped.functions_items() if gv.name_hint.startswith("ring_attention")}
    assert funcs and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in funcs.values())


def test_cpu_ring_attention_default_layout_at_decoder_like_sizes():
    """The default blocks, runs and pages (what the model compiles: 64-row pages, 300 = 4 x 64 + 44)
    over a longer window: full runs, a partial last block, rows of one batch at different positions, one
    of them past a wrap of the ring."""
    heads, kv_heads, head_dim, window = 8, 2, 128, 300
    rng = np.random.default_rng(3)
    starts = np.array([0, 130, 299, 700], np.int32)
    b = len(starts)
    q = rng.standard_normal((b, 1, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((b, 1, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    cache, pages = paged_ring(rng, starts, 1, window, 64, kv_heads, head_dim, np.float32)
    arrays = (q, k, v, cache, pages, starts)
    want = reference(*arrays, window)
    got = _run(ring_attention_cpu(heads, kv_heads, head_dim, window), arrays, q.shape, "float32")
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
