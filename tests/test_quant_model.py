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


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "voxc.cli", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def run(artifact, audio):
    session = voxc.load(artifact).stream()
    session.record_logits = True
    text = session.feed(audio) + session.finish()
    return text, np.array(session.tokens), np.array(session.logits)


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
    assert manifest["left_pad_tokens"] == (76 if qtype == "q4_0" else 32)
    audio = sine_with_noise(seconds=2.0)
    text, tokens, logits = run(tmp_path / "from_gguf", audio)
    direct_text, direct_tokens, direct_logits = run(tmp_path / "direct", audio)
    assert text == direct_text and tokens.tolist() == direct_tokens.tolist()
    assert np.abs(logits - direct_logits).max() < 2e-3 * np.abs(direct_logits).max()


def test_quantize_refuses_a_wrong_output_name(tmp_path, tiny_ckpt_dir):
    result = subprocess.run([sys.executable, "-m", "voxc.cli", "quantize", str(tiny_ckpt_dir), str(tmp_path / "x.bin")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "must end in .gguf" in result.stderr
