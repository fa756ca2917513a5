"""Paged KV caches in the compiled model, against transformers' VoxtralRealtime on the same tiny weights:
windows that are not a multiple of the 64-row page (encoder 100 = 64 + 36 rows, decoder 150 = 64 + 64 +
22), pools that start at one page and grow while streams run, streams past both windows, two streams at
different positions sharing a pool, and a slot whose pages a finished stream held, reused by a new one.
"""
from __future__ import annotations

import numpy as np
import pytest

import voxc
from voxc.build import build
from voxc.loader.tiny import make_tiny

from clips import sine_with_noise
from oracle import Oracle
from references import run_stream

ENCODER_WINDOW, DECODER_WINDOW = 100, 150
REL_TOL = 1e-4


def rel_err(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv_pages")
    make_tiny(root / "ckpt", seed=11, encoder_window=ENCODER_WINDOW, decoder_window=DECODER_WINDOW)
    build(root / "ckpt", "llvm", root / "llvm", progress=False)
    return root / "llvm", Oracle(root / "ckpt")


def _load(artifact, **kwargs):
    return voxc.load(artifact, kv_pages=1, **kwargs)


def _matches_oracle(tokens, logits, ref, what):
    ref_tokens, ref_logits = ref
    assert tokens.tolist() == ref_tokens.tolist(), what
    err = rel_err(np.asarray(logits), ref_logits)
    assert err < REL_TOL, f"{what}: logits relative error {err:.2e}"


def test_page_layout_of_the_tiny_model(paged):
    model = _load(paged[0])
    enc, dec = model.kv["enc_cache"], model.kv["dec_cache"]
    assert (enc.page_rows, enc.pages_per_stream, dec.page_rows, dec.pages_per_stream) == (64, 2, 64, 3)
    assert enc.size == dec.size == 1 and model.kv_bytes_in_use == 0
    assert model.manifest["state"]["dec_cache"]["page_rows"] == 64


def test_a_growth_drops_a_captured_step(paged):
    """A captured CUDA graph replays at the addresses of its capture: a pool that grows (new tensors)
    closes and drops the capture before the old tensors go (the next one-token step captures again)."""
    model = _load(paged[0], max_streams=2)

    class Captured:
        closed = False

        def close(self):
            self.closed = True

    captured = model._decode_captured = Captured()
    old = list(model.dec_cache)
    model.decode(np.ones((2, 1), np.int32), [0, 1], [0, 0])     # two pages: the one-page pools grow
    assert captured.closed and model._decode_captured is None
    assert all(a is not b for a, b in zip(old, model.dec_cache)) and model.kv["dec_cache"].size == 2
    model.decode(np.ones((1, 1), np.int32), [0], [1])            # no growth: nothing to drop
    assert model.kv["dec_cache"].growths == 1


def test_a_stream_past_both_windows_matches_transformers(paged):
    """14 s: 700 encoder frames (the 100-row ring wraps 7 times), 214 decoder positions (150 rows: the
    ring wraps, its last page of 22 rows included); both pools grow from one page to the stream's whole
    windows as it goes, and give the pages back when it ends."""
    artifact, oracle = paged
    model = _load(artifact)
    audio = sine_with_noise(seconds=14.0, freq=260.0, seed=5)
    session = model.stream(480)
    session.record_logits = True
    held = []
    for begin in range(0, len(audio), 1280):
        session.feed(audio[begin:begin + 1280])
        held.append((model.kv["enc_cache"].count[session.slot], model.kv["dec_cache"].count[session.slot]))
    session.finish()
    # the pages follow the positions reached: the first step (the 2.56 s of left padding: 128 encoder
    # frames, the ring's every row) holds the decoder's first page only, the end every page
    assert held[0] == (2, 1) and held[-1] == (2, 3)
    assert [d for _, d in held] == sorted(d for _, d in held)
    assert model.kv["dec_cache"].growths == 2 and model.kv["enc_cache"].growths == 1
    assert model.kv_bytes_in_use == 0                       # finish() gave the pages back
    ref_tokens, ref_logits = oracle.stream_generate(audio)
    tokens, logits = np.array(session.tokens), np.array(session.logits)
    n = min(len(ref_tokens), len(tokens))
    assert n > DECODER_WINDOW
    _matches_oracle(tokens[:n], logits[:n], (ref_tokens[:n], ref_logits[:n]), "14 s stream")


def test_two_streams_at_different_positions_share_a_growing_pool(paged):
    """Stream A runs 3 s alone, then B starts (A 9 s, B 5 s); both advance in the same batched steps while the pools
    (one page at load) grow under them: at B's first step (its left padding) and again when the
    decoder's rings reach new pages.  Each equals transformers' offline transcript of its clip."""
    from voxc.runtime.session import advance

    artifact, oracle = paged
    model = _load(artifact, max_streams=2)
    a = sine_with_noise(seconds=9.0, freq=300.0, seed=8)   # its decoder reaches its third page at 7.7 s
    b = sine_with_noise(seconds=5.0, freq=900.0, seed=9)
    sa, sb = model.stream(480), None
    sa.record_logits = True
    tick = 1280
    lead = 38 * tick              # 3.04 s

    def growths():
        return model.kv["dec_cache"].growths + model.kv["enc_cache"].growths

    counts = []
    for begin in range(0, max(len(a), lead + len(b)), tick):
        if begin < len(a):
            sa.queue(a[begin:begin + tick])
        if begin == lead:
            counts.append(growths())
            sb = model.stream(480)
            sb.record_logits = True
        if sb is not None and begin < lead + len(b):
            sb.queue(b[begin - lead:begin - lead + tick])
        advance([s for s in (sa, sb) if s is not None])
        if begin == lead:
            counts.append(growths())
        for pool in model.kv.values():   # never one page for both
            assert sb is None or not set(pool.pages_of(sa.slot)) & set(pool.pages_of(sb.slot))
    counts.append(growths())
    assert counts[2] > counts[1] > counts[0], f"the pools grew when B started and while both ran: {counts}"
    assert model.kv["dec_cache"].size == 6 and model.kv["enc_cache"].size == 4
    for s in (sa, sb):
        s.end()
    advance([sa, sb])
    _matches_oracle(np.array(sa.tokens), sa.logits, oracle.generate(a), "stream A")
    _matches_oracle(np.array(sb.tokens), sb.logits, oracle.generate(b), "stream B")
    sa.finish()
    sb.finish()


def test_a_stream_without_pages_leaves_the_others_intact(paged):
    """Two streams' first batched encode needs 4 encoder pages of a pool capped at 3: KvCacheFull names
    the stream left without, nothing runs; that stream ends, and the other one, advanced again, loses
    no audio: its tokens equal a fresh model's run of it alone."""
    from voxc.runtime.kv_pages import KvCacheFull
    from voxc.runtime.session import advance

    artifact, _ = paged
    model = _load(artifact, max_streams=2)
    model.kv["enc_cache"].max_pages = 3
    a = sine_with_noise(seconds=3.0, freq=330.0, seed=21)
    sa, sb = model.stream(), model.stream()
    sa.queue(a)
    sb.queue(a[:16000])
    with pytest.raises(KvCacheFull) as err:
        advance([sa, sb])
    assert err.value.slots == [sb.slot] and "the encoder's KV cache is full" in str(err.value)
    sb.drop()
    advance([sa])
    text = sa.take_text() + sa.finish()
    fresh = _load(artifact)
    ref_text, tokens, _ = run_stream(fresh, a)
    assert sa.tokens == tokens.tolist() and text == ref_text
    assert model.kv_bytes_in_use == 0


def test_a_reused_slot_gives_a_fresh_models_tokens(paged):
    """One slot: a 9 s stream fills both pools and ends; the next stream gets the same pages back (still
    holding the old stream's keys) and must equal a freshly loaded model's run, and transformers."""
    artifact, oracle = paged
    model = _load(artifact, max_streams=1)
    first = sine_with_noise(seconds=9.0, freq=500.0, seed=2)
    second = sine_with_noise(seconds=4.0, freq=700.0, seed=3)
    session = model.stream()
    session.feed(first)
    old_pages = {name: pool.pages_of(session.slot) for name, pool in model.kv.items()}
    assert all(old_pages.values())
    session.finish()
    _, tokens, logits = run_stream(model, second, chunk=2000)
    fresh = _load(artifact, max_streams=1)
    _, fresh_tokens, fresh_logits = run_stream(fresh, second, chunk=2000)
    assert tokens.tolist() == fresh_tokens.tolist()
    np.testing.assert_array_equal(logits, fresh_logits)
    _matches_oracle(tokens, logits, oracle.generate(second), "reused slot")
    # the second stream ran on the first one's pages
    session = model.stream()
    session.feed(second[:16000])
    assert set(model.kv["dec_cache"].pages_of(session.slot)) <= set(old_pages["dec_cache"])
    session.finish()


def test_kv_seconds_sizes_every_pool_for_its_streams(paged):
    """``kv_seconds``: each pool starts with the pages that many seconds of audio take in its tower, for
    every stream (the encoder fills 4 positions per 80 ms token, the decoder one), capped at the window;
    streams within it never grow a pool and still decode what transformers does."""
    probe = voxc.load(paged[0])
    cfg = probe.config
    per_second = {"enc_cache": cfg.audio.frame_rate * cfg.audio.downsample_factor, "dec_cache": cfg.audio.frame_rate}
    windows = {"enc_cache": ENCODER_WINDOW, "dec_cache": DECODER_WINDOW}
    # a stream's positions besides its audio: the left padding, then the right padding of the longest
    # delay (30 tokens), one more token, the 10-token buffer and a last partial token
    padding_tokens = probe.left_pad_tokens + 30 + 1 + 10 + 1
    for seconds in (0.5, 1.5, 60):
        model = voxc.load(paged[0], max_streams=3, kv_seconds=seconds)
        for name, pool in model.kv.items():
            rows = min(windows[name], int(np.ceil(seconds * per_second[name] + padding_tokens * per_second[name]
                                                  / cfg.audio.frame_rate)))
            assert pool.size == 3 * -(-rows // pool.page_rows), (name, seconds, pool.size)
    # a stream of exactly kv_seconds of audio at the longest delay, padding and all, grows no pool
    model = voxc.load(paged[0], max_streams=1, kv_seconds=1.0)
    session = model.stream(2400)
    session.feed(sine_with_noise(seconds=1.0, freq=300.0, seed=2))
    session.finish()
    assert session.token_count > 0 and all(pool.growths == 0 for pool in model.kv.values())
    artifact, oracle = paged
    model = voxc.load(artifact, max_streams=2, kv_seconds=60)     # whole windows: nothing left to grow
    audio = sine_with_noise(seconds=4.0, freq=260.0, seed=5)
    ref_tokens, ref_logits = oracle.stream_generate(audio)
    for _ in range(2):                                            # the second one reuses the first's pages
        session = model.stream(480)
        session.record_logits = True
        for begin in range(0, len(audio), 1280):
            session.feed(audio[begin:begin + 1280])
        session.finish()
        tokens, logits = np.array(session.tokens), np.array(session.logits)
        n = min(len(ref_tokens), len(tokens))
        assert n > 20
        _matches_oracle(tokens[:n], logits[:n], (ref_tokens[:n], ref_logits[:n]), "kv_seconds=60")
    assert all(pool.growths == 0 for pool in model.kv.values())


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "15"])
def test_kv_seconds_must_be_a_positive_number(paged, bad):
    with pytest.raises(voxc.VoxcError, match="kv_seconds must be a positive number"):
        voxc.load(paged[0], kv_seconds=bad)


def test_kv_pages_and_kv_seconds_are_one_choice(paged):
    with pytest.raises(voxc.VoxcError, match="not both"):
        voxc.load(paged[0], kv_pages=4, kv_seconds=15)
