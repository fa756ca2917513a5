"""Runtime.staged: a call's small inputs (PCM windows, tokens, slots, positions) go to one device buffer
per role, reused call after call, instead of a fresh tensor each (on CUDA its free stalled the device in
the middle of a batched step)."""
from __future__ import annotations

import numpy as np

from voxc.runtime.tvm_runtime import REUSED_INPUT_KINDS, Runtime


def test_a_role_reuses_its_buffer_and_grows_it_when_an_input_outgrows_it():
    rt = Runtime("cpu")
    first = np.arange(6, dtype=np.int32).reshape(2, 3)
    view = rt.staged("decode_tokens", first)
    assert tuple(view.shape) == (2, 3) and rt.numpy(view).tolist() == first.tolist()
    buffer = rt._staging[("decode_tokens", "int32")]
    smaller = np.array([7, 8, 9], np.int32)
    assert rt.numpy(rt.staged("decode_tokens", smaller)).tolist() == [7, 8, 9]
    assert rt._staging[("decode_tokens", "int32")] is buffer            # no new allocation
    larger = np.arange(10, dtype=np.int32)[::-1]                         # not contiguous: copied first
    assert rt.numpy(rt.staged("decode_tokens", larger)).tolist() == larger.tolist()
    assert int(rt._staging[("decode_tokens", "int32")].shape[0]) == 12  # twice the old size, at least the input
    # roles and dtypes keep buffers of their own: one call's slots do not overwrite its positions
    slots = rt.staged("decode_slots", np.array([3, 1], np.int32))
    starts = rt.staged("decode_starts", np.array([100, 200], np.int32))
    windows = rt.staged("decode_slots", np.ones((2, 4), np.float32))
    assert rt.numpy(slots).tolist() == [3, 1] and rt.numpy(starts).tolist() == [100, 200]
    assert rt.numpy(windows).tolist() == np.ones((2, 4)).tolist()


def test_a_device_whose_copies_may_overtake_queued_kernels_gets_fresh_tensors():
    """wgpu (vulkan, metal) may run a host copy before kernels it has not submitted yet: no reuse there."""
    assert "webgpu" not in REUSED_INPUT_KINDS
    rt = Runtime("cpu")
    rt.kind = "webgpu"          # the decision is the kind's; the copies themselves run on the CPU here
    a = rt.staged("decode_slots", np.array([1, 2], np.int32))
    b = rt.staged("decode_slots", np.array([3, 4], np.int32))
    assert rt.numpy(a).tolist() == [1, 2] and rt.numpy(b).tolist() == [3, 4] and not rt._staging
