"""Streaming: any chunking gives the offline tokens and logits, and equals transformers' own streaming path."""
from __future__ import annotations

import numpy as np
import pytest

import voxc
from voxc.build import build
from voxc.errors import VoxcError
from voxc.loader.tiny import make_tiny

from clips import sine_with_noise
from oracle import Oracle
from references import run_stream, run_ticks

RATE = 16000


@pytest.fixture(scope="module")
def small_windows(tmp_path_factory):
    """Encoder window 8 frames, decoder window 16 tokens: a 14 s clip streams far past both."""
    root = tmp_path_factory.mktemp("stream_small")
    make_tiny(root / "ckpt", seed=7, encoder_window=8, decoder_window=16)
    build(root / "ckpt", "llvm", root / "llvm", progress=False)
    return voxc.load(root / "llvm", max_streams=4), Oracle(root / "ckpt")


def stream(model, audio, chunk_sizes, delay_ms=480):
    text, tokens, logits = run_stream(model, audio, delay_ms=delay_ms, chunk=list(chunk_sizes))
    return tokens, logits, text


def random_split(rng, n_samples):
    """Chunk sizes from 1 sample to 5 s, log-uniform so tiny and huge chunks both occur."""
    sizes = []
    while sum(sizes) < n_samples:
        sizes.append(int(np.exp(rng.uniform(0, np.log(5 * RATE)))))
    return sizes


def test_random_chunkings_equal_offline(small_windows):
    model, _ = small_windows
    audio = sine_with_noise(seconds=6.0, freq=350.0, seed=3)
    ref_tokens, ref_logits, ref_text = stream(model, audio, [len(audio)])
    rng = np.random.default_rng(2026)
    for split in range(20):
        tokens, logits, text = stream(model, audio, random_split(rng, len(audio)))
        assert tokens.tolist() == ref_tokens.tolist(), f"split {split}"
        assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max(), f"split {split}"
        assert text == ref_text


def test_one_sample_at_a_time_equals_offline(small_windows):
    model, _ = small_windows
    audio = sine_with_noise(seconds=0.4, freq=500.0, seed=4)
    ref_tokens, ref_logits, _ = stream(model, audio, [len(audio)])
    tokens, logits, _ = stream(model, audio, [1] * len(audio))
    assert tokens.tolist() == ref_tokens.tolist()
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()


def test_streams_past_both_windows_like_transformers_streaming(small_windows):
    model, oracle = small_windows
    audio = sine_with_noise(seconds=14.0, freq=260.0, seed=5)  # 700 encoder frames, 175 tokens: >> 8 and 16
    ref_tokens, ref_logits = oracle.stream_generate(audio)
    tokens, logits, _ = stream(model, audio, [1280] * (len(audio) // 1280 + 1))
    n = min(len(ref_tokens), len(tokens))
    assert n > 10 * 16
    assert tokens[:n].tolist() == ref_tokens[:n].tolist()
    assert np.abs(logits[:n] - ref_logits[:n]).max() <= 1e-4 * np.abs(ref_logits).max()


def test_concurrent_sessions_are_independent(small_windows):
    model, _ = small_windows
    a = sine_with_noise(seconds=2.0, freq=300.0, seed=8)
    b = sine_with_noise(seconds=2.0, freq=900.0, seed=9)
    ref_a, _, _ = stream(model, a, [len(a)])
    ref_b, _, _ = stream(model, b, [len(b)])
    sa, sb = model.stream(), model.stream()
    for begin in range(0, len(a), 3000):  # interleaved: each uses its own cache slot
        sa.feed(a[begin:begin + 3000])
        sb.feed(b[begin:begin + 3000])
    sa.finish()
    sb.finish()
    assert sa.tokens == ref_a.tolist() and sb.tokens == ref_b.tolist()


def test_batched_advance_equals_separate_streams(small_windows):
    """A server's path: chunks of several streams queued, then one batched encode/decode per tick; each
    stream with its own delay (the decoder reads each row's own delay scales)."""
    model, _ = small_windows
    audios = [sine_with_noise(seconds=s, freq=f, seed=i) for i, (s, f) in enumerate([(2.0, 300), (3.1, 700), (1.3, 450)])]
    delays = [480, 160, 1200]
    references = [stream(model, a, [len(a)], delay_ms=d) for a, d in zip(audios, delays)]
    sessions = run_ticks(model, audios, delays_ms=delays)
    for s, (ref_tokens, ref_logits, _) in zip(sessions, references):
        assert s.tokens == ref_tokens.tolist()
        assert np.abs(np.array(s.logits) - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
        s.finish()


def test_bad_use_is_refused_clearly(small_windows):
    model, _ = small_windows
    session = model.stream()
    with pytest.raises(VoxcError, match="NaN"):
        session.feed(np.full(100, np.nan, np.float32))
    with pytest.raises(VoxcError, match="int16"):
        session.feed(np.zeros(100, np.int16))
    with pytest.raises(VoxcError, match="1-D"):
        session.feed(np.zeros((2, 100), np.float32))
    session.finish()
    with pytest.raises(VoxcError, match="finished"):
        session.feed(np.zeros(100, np.float32))
    with pytest.raises(VoxcError, match="delay"):
        model.stream(delay_ms=100)
