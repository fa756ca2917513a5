"""Test audio: synthetic clips, espeak-ng speech (deterministic with sox -D), and real speech
shipped by the PyPI package pytest-audioeval.  All float32 mono 16 kHz."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

RATE = 16000


def silence(seconds: float = 1.5) -> np.ndarray:
    return np.zeros(int(RATE * seconds), np.float32)


def sine_with_noise(seconds: float = 2.3, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def espeak_wav(text: str, path: Path) -> Path:
    """espeak-ng speech as a 16 kHz float32 WAV; ``sox -D`` (no dither) keeps it byte-identical across runs."""
    raw = path.with_name(path.stem + "_22k.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", "-D", str(raw), "-r", str(RATE), "-c", "1", "-e", "floating-point", "-b", "32", str(path)],
                   check=True, capture_output=True)
    return path


def espeak(text: str) -> np.ndarray | None:
    """espeak-ng speech as an array; None if espeak-ng or sox is absent."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        return None
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        audio, rate = soundfile.read(espeak_wav(text, Path(tmp) / "speech.wav"), dtype="float32")
    assert rate == RATE
    return audio


def real_speech() -> dict[str, np.ndarray]:
    """English clips with transcripts from pytest-audioeval (empty if the package is absent)."""
    try:
        import importlib.resources as resources
        root = resources.files("pytest_audioeval") / "samples" / "audio" / "en"
    except ModuleNotFoundError:
        return {}
    import soundfile

    clips = {}
    for wav in sorted(Path(str(root)).glob("*.wav")):
        audio, rate = soundfile.read(wav, dtype="float32")
        if audio.ndim == 2:
            audio = audio.mean(axis=1)
        assert rate == RATE, wav
        clips[wav.stem] = audio.astype(np.float32)
    return clips


def standard_clips() -> dict[str, np.ndarray]:
    clips = {"silence": silence(), "sine": sine_with_noise()}
    speech = espeak("hello world, the quick brown fox")
    if speech is not None:
        clips["espeak"] = speech
    clips.update(list(real_speech().items())[:1])
    return clips
