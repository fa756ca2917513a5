"""Quantized models end to end: `voxc quantize` -> GGUF -> `voxc build` -> transcription."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import voxc
from voxc.build import build

from clips import sine_with_noise
from references import run_stream


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "voxc.cli", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def run(artifact, audio):
    return run_stream(voxc.load(artifact), audio)


@pytest.mark.parametrize("qtype", ["q4_k", "q4_0", "q8_0"])
def test_gguf_build_equals_direct_quantized_build(tmp_path, tiny_ckpt_dir, qtype):
    """The GGUF path stores the same quantized blocks the direct build makes; they differ only where
    the file keeps a float tensor in float16 (convs, rows too short for any block) and the direct
    build keeps float32."""
    gguf_file = tmp_path / f"tiny-{qtype}.gguf"
    cli("quantize", tiny_ckpt_dir, gguf_file, "--type", qtype)
    build(gguf_file, "llvm", tmp_path / "from_gguf", progress=False)
    build(tiny_ckpt_dir, "llvm", tmp_path / "direct", progress=False, quantization=qtype)
    manifest = json.loads((tmp_path / "from_gguf" / "voxc-artifact.json").read_text())
    assert manifest["quantization"] == qtype
    assert manifest["streaming"]["left_pad_tokens"] == (76 if qtype == "q4_0" else 32)
    audio = sine_with_noise(seconds=2.0)
    text, tokens, logits = run(tmp_path / "from_gguf", audio)
    direct_text, direct_tokens, direct_logits = run(tmp_path / "direct", audio)
    assert text == direct_text and tokens.tolist() == direct_tokens.tolist()
    assert np.abs(logits - direct_logits).max() < 2e-3 * np.abs(direct_logits).max()


def test_quantize_refuses_a_wrong_output_name(tmp_path, tiny_ckpt_dir):
    result = subprocess.run([sys.executable, "-m", "voxc.cli", "quantize", str(tiny_ckpt_dir), str(tmp_path / "x.bin")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "must end in .gguf" in result.stderr


@pytest.mark.parametrize("layout", ["trevors", "crispasr", "transcribe_cpp", "audio_cpp", "voxtral_cpp"])
def test_community_gguf_builds_compute_the_dequantized_model(tmp_path, layout):
    """A community file (synthetic, in that project's names, row order and types) built by voxc must
    compute exactly the model its blocks dequantize to: checked against a float32 build of those
    dequantized weights in the official layout.  Catches any name, RoPE-order or packing slip."""
    import dataclasses

    from test_quant import _layout_file, toy_config

    from voxc.loader.names import expected_shapes
    from voxc.loader.tiny import write_checkpoint
    from voxc.tokenizer import TINY_VOCAB_SIZE, write_tiny_tekken

    base = toy_config()
    cfg = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, vocab_size=TINY_VOCAB_SIZE))
    rng = np.random.default_rng(4)
    weights = {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    gguf_file = tmp_path / f"{layout}.gguf"
    _layout_file(gguf_file, layout, cfg, weights, np.random.default_rng(5))
    from voxc.loader.gguf import read_gguf
    _, tensors, meta = read_gguf(gguf_file, config=cfg)
    dequantized = {name: value.dequantize() if hasattr(value, "dequantize") else np.asarray(value, np.float32)
                   for name, value in tensors}
    # Types voxc has no kernels for (Q6_K, Q5_K, BF16 ...) are re-quantized to the file's main type by
    # the build; the reference goes through the same rounding.
    from voxc.quant import linear_storage
    from voxc.quant.formats import quantize_tensor
    for name in meta["transcoded"]:
        storage = linear_storage(dequantized[name].shape[1], meta["qtype"])
        if storage is not None:
            dequantized[name] = quantize_tensor(dequantized[name], storage).dequantize()
    write_checkpoint(tmp_path / "float", dequantized, cfg)
    tekken = write_tiny_tekken(tmp_path / "tekken.json")
    # float activations: the logits check below is float rounding only (the default int8-activation
    # GEMVs keep the tokens here but move logits by ~1.2e-3 of their range)
    from targets import get_target
    float_llvm = dataclasses.replace(get_target("llvm"), int8_activations=False)
    build(gguf_file, float_llvm, tmp_path / "community", progress=False, left_pad_tokens=32, tokenizer=tekken)
    build(tmp_path / "float", "llvm", tmp_path / "reference", progress=False)
    audio = sine_with_noise(seconds=1.5)
    _, tokens, logits = run(tmp_path / "community", audio)
    _, ref_tokens, ref_logits = run(tmp_path / "reference", audio)
    assert tokens.tolist() == ref_tokens.tolist()
    # fused dequant kernels sum in another order than a dense matmul: float rounding only (a name
    # or row-order slip moves logits by their own size)
    assert np.abs(logits - ref_logits).max() < 1e-3 * np.abs(ref_logits).max()


def test_int8_activations_keep_the_tokens(tmp_path):
    """`--int8-activations` (llvm): the int8 GEMVs give the float-activation build's tokens (Q4_K),
    logits within the activation rounding (a few percent of their range on a small model)."""
    import dataclasses

    from references import q4k_config
    from targets.llvm import TARGET
    from voxc.loader.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "ckpt", seed=5, config=q4k_config())   # widths that fit Q4_K's blocks
    build(ckpt, "llvm", tmp_path / "float", progress=False, quantization="q4_k")
    build(ckpt, "llvm", tmp_path / "int8", progress=False, quantization="q4_k", int8_activations=True)
    if dataclasses.replace(TARGET, int8_activations=True).int8_isa() is None:
        pytest.skip("this CPU has no integer dot products voxc uses")
    audio = sine_with_noise(seconds=2.0)
    _, tokens, logits = run(tmp_path / "int8", audio)
    _, ref_tokens, ref_logits = run(tmp_path / "float", audio)
    assert tokens.tolist() == ref_tokens.tolist()
    assert 0 < np.abs(logits - ref_logits).max() < 5e-2 * np.abs(ref_logits).max()
