"""8-bit KV caches (``voxc build --kv-int8``): int8 values with a float32 scale per row and head.

Against transformers on the same tiny weights: the greedy tokens stay, the logits move by the cache's
rounding only (a wrong scale, page offset or row order moves them by their own size); any chunking of a
stream equals the offline run (the chunk's own keys are rounded as the cache rounds them); the
manifest and state say what the pools hold; targets without 8-bit kernels refuse in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

import voxc
from voxc import artifact
from voxc.build import build
from voxc.errors import VoxcError
from voxc.loader.tiny import make_tiny

from clips import sine_with_noise
from oracle import Oracle
from references import run_stream

# the caches' rounding (1/254 of a row's range) moves the tiny model's logits by about 2e-3 of their range
INT8_LOGITS_TOL = 1e-2


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def small_windows(tmp_path_factory):
    """Encoder window 8, decoder window 16: a 14 s stream wraps both rings many times."""
    root = tmp_path_factory.mktemp("kv_int8")
    make_tiny(root / "ckpt", seed=7, encoder_window=8, decoder_window=16)
    build(root / "ckpt", "llvm", root / "int8", progress=False, kv_int8="all")
    build(root / "ckpt", "llvm", root / "float", progress=False)
    return root, voxc.load(root / "int8", max_streams=2), voxc.load(root / "float", max_streams=2), Oracle(root / "ckpt")


def test_int8_caches_stream_like_transformers(small_windows):
    _, model, float_model, oracle = small_windows
    audio = sine_with_noise(seconds=14.0, freq=260.0, seed=5)
    ref_tokens, ref_logits = oracle.stream_generate(audio)
    _, tokens, logits = run_stream(model, audio, delay_ms=480, chunk=[1280] * (len(audio) // 1280 + 1))
    _, _, float_logits = run_stream(float_model, audio, delay_ms=480, chunk=[1280] * (len(audio) // 1280 + 1))
    n = min(len(ref_tokens), len(tokens))
    assert n > 10 * 16
    assert tokens[:n].tolist() == ref_tokens[:n].tolist()
    assert rel_err(logits[:n], ref_logits[:n]) < INT8_LOGITS_TOL
    # the 8-bit build really rounds: it is farther from transformers than the float build
    assert rel_err(logits[:n], ref_logits[:n]) > 10 * rel_err(float_logits[:n], ref_logits[:n])


def test_int8_caches_any_chunking_equals_offline(small_windows):
    _, model, _, _ = small_windows
    audio = sine_with_noise(seconds=4.0, freq=350.0, seed=3)
    _, ref_tokens, ref_logits = run_stream(model, audio, delay_ms=480)
    rng = np.random.default_rng(8)
    for split in range(3):
        sizes = []
        while sum(sizes) < len(audio):
            sizes.append(int(np.exp(rng.uniform(0, np.log(3 * 16000)))))
        _, tokens, logits = run_stream(model, audio, delay_ms=480, chunk=sizes)
        assert tokens.tolist() == ref_tokens.tolist(), f"split {split}"
        assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max(), f"split {split}"


def test_int8_manifest_and_state(small_windows):
    root, model, float_model, _ = small_windows
    manifest = json.loads((root / "int8" / artifact.MANIFEST).read_text())
    assert manifest["kv_int8"] == ["encoder", "decoder"]
    for name in ("enc_cache", "dec_cache"):
        spec, float_spec = manifest["state"][name], json.loads((root / "float" / artifact.MANIFEST).read_text())["state"][name]
        assert spec["dtype"] == "int8" and len(spec["shape"]) == 2
        # float32 build: an 8-bit page is about a quarter (values) plus the scales
        assert spec["tensor_bytes_per_page"] < 0.5 * float_spec["tensor_bytes_per_page"]
        assert model.kv[name].dtype == "int8"
    bad = dict(manifest, kv_int8=["decoder", "encoder"])
    with pytest.raises(VoxcError, match="kv_int8"):
        artifact._check_manifest(root / "int8" / artifact.MANIFEST, bad)
    with pytest.raises(VoxcError, match="state section"):
        artifact._check_manifest(root / "int8" / artifact.MANIFEST, dict(manifest, kv_int8=["encoder"]))


def test_encoder_only_int8_at_the_reference_windows(tmp_path):
    make_tiny(tmp_path / "ckpt", seed=3)
    build(tmp_path / "ckpt", "llvm", tmp_path / "int8", progress=False, kv_int8="encoder")
    model, oracle = voxc.load(tmp_path / "int8"), Oracle(tmp_path / "ckpt")
    assert model.kv["enc_cache"].dtype == "int8" and model.kv["dec_cache"].dtype == "float32"
    audio = sine_with_noise(seconds=3.0, freq=440.0, seed=1)
    ref_tokens, ref_logits = oracle.generate(audio)
    _, tokens, logits = run_stream(model, audio, delay_ms=480)
    assert tokens.tolist() == ref_tokens.tolist()
    assert 0 < rel_err(logits, ref_logits) < INT8_LOGITS_TOL


@pytest.mark.parametrize("target,towers,message", [
    ("webgpu", "encoder", "no 8-bit KV-cache kernels"),
    ("llvm", "encoder,vision", "the towers are encoder, decoder"),
])
def test_int8_refusals_are_one_line(tmp_path, target, towers, message):
    make_tiny(tmp_path / "ckpt", seed=1)
    with pytest.raises(VoxcError, match=message) as info:
        build(tmp_path / "ckpt", target, tmp_path / "out", progress=False, kv_int8=towers)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
