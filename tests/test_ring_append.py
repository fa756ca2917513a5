"""ring_append (schedules/ring_attention.py) writes a chunk's last min(n, W) keys and values into ring
rows (start + i) mod W of each sequence, through its page-table row (row r in row r % P of page
pages[r // P]), on llvm, for one and several kv heads (one kv head is the MQA case its single-store form
exists for: dlight could not schedule the two-store block for GPUs), pages of one row to the whole
window, windows not a multiple of the page."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from schedules.ring_attention import ring_append_func  # noqa: E402


def _expected(cache, k, v, pages, starts, window):
    out = cache.copy()
    n, page_rows = k.shape[1], cache.shape[2]
    m = min(n, window)
    for b in range(k.shape[0]):
        for i in range(m):
            row = (int(starts[b]) + n - m + i) % window
            out[pages[b, row // page_rows], 0, row % page_rows] = k[b, n - m + i]
            out[pages[b, row // page_rows], 1, row % page_rows] = v[b, n - m + i]
    return out


@pytest.mark.parametrize("kv_heads,head_dim,window,page_rows,n", [
    (1, 8, 5, 2, 3), (1, 4, 4, 4, 9), (2, 6, 16, 5, 7), (3, 2, 3, 1, 1), (2, 4, 130, 64, 70)])
def test_ring_append_writes_the_last_rows_of_each_chunk(kv_heads, head_dim, window, page_rows, n):
    func = ring_append_func(kv_heads, head_dim, window, "float32", page_rows=page_rows).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    rng = np.random.default_rng(0)
    b, per_ring = 3, -(-window // page_rows)
    n_pages = b * per_ring + 3
    pages = rng.permutation(n_pages)[:b * per_ring].reshape(b, per_ring).astype(np.int32)
    cache = rng.standard_normal((n_pages, 2, page_rows, kv_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((b, n, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((b, n, kv_heads, head_dim)).astype(np.float32)
    starts = np.array([0, 7, 123], np.int32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(cache, dev)
    lib["main"](out, tvm.runtime.tensor(k, dev), tvm.runtime.tensor(v, dev), tvm.runtime.tensor(pages, dev),
                tvm.runtime.tensor(starts, dev))
    np.testing.assert_array_equal(out.numpy(), _expected(cache, k, v, pages, starts, window))


def test_odd_attention_configs_through_the_llvm_pipeline(tmp_path):
    """tests/gpu_attention_check.py (the GPU check of odd configs: MQA, masked head blocks, head
    sizes 2..256, windows shorter than the chunk, float16) run on the CPU: attention and the append,
    through the llvm target's pipeline, against its numpy reference."""
    import gpu_attention_check as check

    check.build(tmp_path, target_name="llvm")
    assert check.run(tmp_path, "cpu") == 0
