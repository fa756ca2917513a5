"""Shared fixtures: tiny checkpoints, the transformers oracle built from them, and test audio.

torch/transformers are imported only by the oracle fixtures (through ``tests/oracle.py``), so
tests that do not ask for the oracle do not pay for importing them.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from voxc.loader.tiny import make_tiny
from voxc.tokenizer import write_tiny_tekken

from clips import espeak_wav

SAMPLE_RATE = 16000


# ---- tiny checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory) -> Path:
    """Official-layout tiny checkpoint (seed 0, varied-token scales, windows 750 / 8192)."""
    return make_tiny(tmp_path_factory.mktemp("tiny_official"))


@pytest.fixture(scope="session")
def tiny_ckpt_small_windows_dir(tmp_path_factory) -> Path:
    """Same weights, encoder window 8 and decoder window 16: the decoder window is shorter than the
    39-token prompt, and both windows are exceeded by a few seconds of audio."""
    return make_tiny(tmp_path_factory.mktemp("tiny_small_windows"), encoder_window=8, decoder_window=16)


@pytest.fixture(scope="session")
def tiny_ckpt_hf_dir(tmp_path_factory) -> Path:
    """The weights of ``tiny_ckpt_dir`` in transformers' layout (config.json + model.safetensors)."""
    return make_tiny(tmp_path_factory.mktemp("tiny_hf"), layout="hf")


@pytest.fixture(scope="session")
def tiny_ckpt_bf16_dir(tmp_path_factory) -> Path:
    """The weights of ``tiny_ckpt_dir`` rounded to bfloat16, official layout (as the real release)."""
    return make_tiny(tmp_path_factory.mktemp("tiny_bf16"), dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_tekken_path(tmp_path_factory) -> Path:
    return write_tiny_tekken(tmp_path_factory.mktemp("tekken"))


# ---- the transformers oracle ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def oracle(tiny_ckpt_dir):
    """``tests.oracle.Oracle`` (HF VoxtralRealtime, fp32) holding the weights of ``tiny_ckpt_dir``."""
    from oracle import Oracle
    return Oracle(tiny_ckpt_dir)


@pytest.fixture(scope="session")
def oracle_small_windows(tiny_ckpt_small_windows_dir):
    from oracle import Oracle
    return Oracle(tiny_ckpt_small_windows_dir)


@pytest.fixture(scope="session")
def oracle_mel(oracle):
    """``oracle_mel(audio, delay_tokens=6) -> [n_mels, frames]``: offline features of the padded audio."""
    return oracle.mel


@pytest.fixture(scope="session")
def oracle_stages(oracle):
    """``oracle_stages(audio) -> dict(mel, conv_out, encoder_out, adapter_out, input_ids)``."""
    return oracle.stages


@pytest.fixture(scope="session")
def oracle_generate(oracle):
    """``oracle_generate(audio, delay_tokens=6) -> (tokens, per-step logits)``, offline greedy."""
    return oracle.generate


@pytest.fixture(scope="session")
def oracle_stream_generate(oracle):
    """``oracle_stream_generate(audio, delay_tokens=6) -> (tokens, per-step logits)``, HF streaming path."""
    return oracle.stream_generate


@pytest.fixture(scope="session")
def oracle_logits(oracle):
    """``oracle_logits(audio, token_ids, delay_tokens=6) -> [len(token_ids), vocab]``, teacher-forced."""
    return oracle.logits


# ---- audio ------------------------------------------------------------------------------------------
# espeak-ng is deterministic and `sox -D` (no dither) makes the resampling deterministic too.
SPEECH_TEXTS = {
    "hello_world": "hello world",
    "world_hello": "world hello",
    "the_world": "the world",
    "sentence": "the quick brown fox jumps over the lazy dog, then hello world again",
}


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install espeak-ng sox)")


def _espeak(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_22k_wav(tmp_path_factory) -> Path:
    """espeak-ng's own output for "hello world": 22050 Hz, 16-bit mono WAV."""
    _require_tools("espeak-ng")
    return _espeak("hello world", tmp_path_factory.mktemp("espeak22k") / "hello_world_22k.wav")


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory) -> dict[str, Path]:
    """name -> 16 kHz float32 mono WAV of :data:`SPEECH_TEXTS` spoken by espeak-ng."""
    _require_tools("espeak-ng", "sox")
    out = tmp_path_factory.mktemp("speech")
    clips = {}
    for name, text in SPEECH_TEXTS.items():
        clips[name] = espeak_wav(text, out / f"{name}.wav")
    return clips


@pytest.fixture(scope="session")
def silence_16k() -> np.ndarray:
    """One second of digital silence (its log-mel is exactly -0.625 everywhere)."""
    return np.zeros(SAMPLE_RATE, np.float32)


@pytest.fixture(scope="session")
def sine_16k() -> np.ndarray:
    """Two seconds of a 1 kHz sine, amplitude 0.5."""
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)


@pytest.fixture(scope="session")
def audioeval_clips() -> dict[str, tuple[Path, str]]:
    """name -> (16 kHz WAV, reference transcript) of the English real-speech clips of the PyPI
    package pytest-audioeval (``pip install --no-deps pytest-audioeval==0.1.3``)."""
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pytest-audioeval is not installed (pip install --no-deps pytest-audioeval==0.1.3)")
    english = Path(list(spec.submodule_search_locations)[0]) / "samples" / "audio" / "en"
    return {wav.stem: (wav, wav.with_suffix(".txt").read_text().strip()) for wav in sorted(english.glob("*.wav"))}
