"""ring_append (schedules/ring_attention.py) writes a chunk's last min(n, W) keys and values into ring
rows (start + i) mod W of its slot, on llvm, for one and several kv heads (one kv head is the MQA
case its single-store form exists for: dlight could not schedule the two-store block for GPUs)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from schedules.ring_attention import ring_append_func  # noqa: E402


def _expected(cache, k, v, slots, starts, window):
    out = cache.copy()
    n = k.shape[1]
    m = min(n, window)
    for b in range(k.shape[0]):
        for i in range(m):
            row = (int(starts[b]) + n - m + i) % window
            out[0, slots[b], row] = k[b, n - m + i]
            out[1, slots[b], row] = v[b, n - m + i]
    return out


@pytest.mark.parametrize("kv_heads,head_dim,window,n", [(1, 8, 5, 3), (1, 4, 4, 9), (2, 6, 16, 7), (3, 2, 3, 1)])
def test_ring_append_writes_the_last_rows_of_each_chunk(kv_heads, head_dim, window, n):
    func = ring_append_func(kv_heads, head_dim, window, "float32").with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    rng = np.random.default_rng(0)
    slots_n, b = 4, 3
    cache = rng.standard_normal((2, slots_n, window, kv_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((b, n, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((b, n, kv_heads, head_dim)).astype(np.float32)
    slots = np.array([2, 0, 3], np.int32)
    starts = np.array([0, 7, 123], np.int32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(cache, dev)
    lib["main"](out, tvm.runtime.tensor(k, dev), tvm.runtime.tensor(v, dev), tvm.runtime.tensor(slots, dev),
                tvm.runtime.tensor(starts, dev))
    np.testing.assert_array_equal(out.numpy(), _expected(cache, k, v, slots, starts, window))


def test_odd_attention_configs_through_the_llvm_pipeline(tmp_path):
    """tests/gpu_attention_check.py (the GPU check of odd configs: MQA, masked head blocks, head
    sizes 2..256, windows shorter than the chunk, float16) run on the CPU: attention and the append,
    through the llvm target's pipeline, against its numpy reference."""
    import gpu_attention_check as check

    check.build(tmp_path, target_name="llvm")
    assert check.run(tmp_path, "cpu") == 0
