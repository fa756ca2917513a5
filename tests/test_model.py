"""The compiled model against transformers' VoxtralRealtime, stage by stage, on the same tiny weights.

Logits are compared, not just tokens: a wrong RoPE row order keeps the greedy tokens and moves the
logits (see ../shared/research/oracle.md).
"""
from __future__ import annotations

import numpy as np
import pytest

import voxc
from voxc.build import build
from voxc.loader.tiny import make_tiny
from voxc.runtime.framing import offline_padded

from oracle import Oracle
from references import run_stream

REL_TOL = 1e-4
# (encoder window, decoder window): the reference's, and windows shorter than the clips and than
# the 39-token prompt, so both sliding windows and the prefill mask are exercised.
WINDOWS = [(750, 8192), (8, 16), (40, 24)]


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture(scope="module", params=WINDOWS, ids=lambda w: f"enc{w[0]}-dec{w[1]}")
def tiny(request, tmp_path_factory):
    encoder_window, decoder_window = request.param
    root = tmp_path_factory.mktemp(f"tiny_{encoder_window}_{decoder_window}")
    make_tiny(root / "ckpt", seed=encoder_window + decoder_window, encoder_window=encoder_window,
              decoder_window=decoder_window)
    build(root / "ckpt", "llvm", root / "llvm", progress=False)
    return voxc.load(root / "llvm"), Oracle(root / "ckpt")


def run_session(model, audio, delay_ms=480, chunk=None):
    return run_stream(model, audio, delay_ms=delay_ms, chunk=chunk)[1:]


def test_stages_match_transformers(tiny, clips):
    model, oracle = tiny
    cfg = model.config
    rt = model.rt
    for name, audio in clips.items():
        ref = oracle.stages(audio)
        padded = np.concatenate([np.zeros(model.left_pad_tokens * cfg.audio.samples_per_token, np.float32), audio])
        right = (-len(audio)) % cfg.audio.samples_per_token + 17 * cfg.audio.samples_per_token
        padded = np.concatenate([padded, np.zeros(right, np.float32)])
        samples, n_frames = offline_padded(padded, cfg.audio)
        mel = model.mel(samples)
        np.testing.assert_allclose(rt.numpy(mel)[0], ref["mel"], atol=1e-4, err_msg=f"mel, clip {name}")
        # The encoder consumes the reference mel, so each stage is checked on its own.
        ref_mel = rt.tensor(ref["mel"][None].astype(np.float32))
        slot = model.slots.acquire()
        try:
            model.reset_slot(slot, model.delay_tokens(model.default_delay_ms))
            out = model.encode(ref_mel, np.array([slot], np.int32), np.array([0], np.int32), stages=True)
        finally:
            model.slots.release(slot)
        for stage, index in (("conv_out", 0), ("encoder_out", 1), ("adapter_out", 2)):
            err = rel_err(rt.numpy(out[index])[0], ref[stage])
            assert err < REL_TOL, f"{stage} of clip {name}: relative error {err:.2e}"


def test_greedy_tokens_and_logits_match_transformers(tiny, clips):
    model, oracle = tiny
    for name, audio in clips.items():
        ref_tokens, ref_logits = oracle.generate(audio)
        tokens, logits = run_session(model, audio)
        assert tokens.tolist() == ref_tokens.tolist(), f"clip {name}"
        err = rel_err(logits, ref_logits)
        assert err < REL_TOL, f"logits of clip {name}: relative error {err:.2e}"


@pytest.mark.parametrize("delay_ms", [80, 960, 2400])
def test_other_delays_match_transformers(tiny, clips, delay_ms):
    model, oracle = tiny
    audio = clips["sine"]
    ref_tokens, ref_logits = oracle.generate(audio, delay_tokens=delay_ms // 80)
    tokens, logits = run_session(model, audio, delay_ms=delay_ms)
    assert tokens.tolist() == ref_tokens.tolist()
    assert rel_err(logits, ref_logits) < REL_TOL


def test_long_clip_past_the_encoder_window(tiny, long_clip):
    """17 s of audio: 850+ encoder frames, past the reference's 750-frame window."""
    model, oracle = tiny
    ref_tokens, ref_logits = oracle.generate(long_clip)
    tokens, logits = run_session(model, long_clip)
    assert tokens.tolist() == ref_tokens.tolist()
    assert rel_err(logits, ref_logits) < REL_TOL


@pytest.fixture(scope="module")
def clips():
    from clips import standard_clips
    return standard_clips()


@pytest.fixture(scope="module")
def long_clip():
    from clips import sine_with_noise
    return sine_with_noise(seconds=17.0, freq=300.0, seed=1)
