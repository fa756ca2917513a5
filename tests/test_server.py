"""voxc serve: real clients on loopback against the tiny model (CPU artifact).

Every streamed transcript is compared with the offline pass over the same samples (the client's
PCM16 as the server decodes it), through vLLM's and OpenAI's realtime events and the HTTP file
endpoint; misbehaving clients (malformed events, bad audio, oversized frames, vanishing mid-stream,
too many of them, idle) get errors or a clear refusal and leave everybody else's text unchanged."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the server needs aiohttp (pip install aiohttp)")

import voxc
from voxc.runtime import session as session_mod
from voxc.server.app import ServerConfig, ServerThread
from voxc.server.timestamps import Piece, Segmenter, to_srt, to_vtt, token_span

from clips import sine_with_noise

ROOT = Path(__file__).resolve().parents[1]
VLLM_DELTA, VLLM_DONE = "transcription.delta", "transcription.done"
OAI_DELTA = "conversation.item.input_audio_transcription.delta"
OAI_DONE = "conversation.item.input_audio_transcription.completed"


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_ckpt_dir, tmp_path_factory):
    from voxc.build import build

    out = tmp_path_factory.mktemp("server") / "tiny-llvm"
    build(tiny_ckpt_dir, "llvm", out, progress=False)
    return out


@pytest.fixture(scope="module")
def offline(artifact):
    """offline(pcm float32 16 kHz, delay_ms=None) -> model.transcribe(pcm)."""
    model = voxc.load(artifact)
    return lambda pcm, delay_ms=None: model.transcribe(pcm, delay_ms)


@pytest.fixture(scope="module")
def server(artifact):
    model = voxc.load(artifact, max_streams=8)
    with ServerThread(model, ServerConfig(max_sessions=8, max_message_bytes=64 << 10)) as srv:
        yield srv


def pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


def as_received(pcm: np.ndarray) -> np.ndarray:
    """The float samples the server decodes from pcm16(pcm)."""
    return np.frombuffer(pcm16(pcm), "<i2").astype(np.float32) / 32768


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm16(pcm)).decode()


def clip(i: int, seconds: float = 2.0) -> np.ndarray:
    return sine_with_noise(seconds + 0.17 * i, freq=220.0 + 97.0 * i, seed=100 + i)


def run(coro):
    return asyncio.run(coro)


async def next_event(ws, timeout=60):
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def until(ws, kinds, timeout=60):
    """Events up to and including the first whose type is in ``kinds``."""
    seen = []
    while True:
        ev = await next_event(ws, timeout)
        seen.append(ev)
        if ev["type"] in kinds:
            return seen


async def vllm_client(url, pcm, *, chunk=1600, delay_ms=None, pace=0.0, gate=None):
    """One vLLM-protocol session.  ``gate``: (samples, async callable): after the first ``samples`` of
    audio the client awaits the callable before it sends the rest."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/v1/realtime") as ws:
        created = await next_event(ws)
        assert created["type"] == "session.created" and created["id"]
        update = {"type": "session.update", "model": "mistralai/Voxtral-Mini-4B-Realtime-2602"}
        if delay_ms is not None:
            update["session"] = {"delay_ms": delay_ms}
        await ws.send_json(update)
        await ws.send_json({"type": "input_audio_buffer.commit"})
        parts = [pcm] if gate is None else [pcm[:gate[0]], pcm[gate[0]:]]
        for n, part in enumerate(parts):
            if n:
                await gate[1]()
            for i in range(0, len(part), chunk):
                await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(part[i:i + chunk])})
                if pace:
                    await asyncio.sleep(pace)
        await ws.send_json({"type": "input_audio_buffer.commit", "final": True})
        return await until(ws, {VLLM_DONE, "error"})


async def openai_client(url, pcm, *, rate=16000, chunk=2000):
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/v1/realtime?intent=transcription") as ws:
        created = await next_event(ws)
        assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
        session = {"type": "transcription", "audio": {"input": {"transcription": {"model": "voxtral"},
                                                                "turn_detection": None}}}
        if rate != 24000:
            session["audio"]["input"]["format"] = {"type": "audio/pcm", "rate": rate}
        await ws.send_json({"type": "session.update", "session": session})
        updated = await next_event(ws)
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["audio"]["input"]["format"]["rate"] == rate
        for i in range(0, len(pcm), chunk):
            await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(pcm[i:i + chunk])})
        await ws.send_json({"type": "input_audio_buffer.commit"})
        return await until(ws, {OAI_DONE, "error"})


def check_transcript(events, expected, duration):
    """Deltas add up to the done text, which equals ``expected``; timestamps are ordered and in range."""
    done = events[-1]
    assert done["type"] in (VLLM_DONE, OAI_DONE), events[-3:]
    deltas = [e for e in events if e["type"] in (VLLM_DELTA, OAI_DELTA)]
    text = done.get("text", done.get("transcript"))
    assert "".join(e["delta"] for e in deltas) == text
    assert text == expected
    ends = [e["end"] for e in deltas]
    assert ends == sorted(ends), ends
    spans = [(e["start"], e["end"]) for e in deltas]
    assert all(0 <= start <= end <= duration + 5e-4 for start, end in spans), spans   # rounded to the ms
    assert done["duration"] == pytest.approx(duration, abs=1e-3)
    assert "".join(s["text"] for s in done["segments"]) == text
    return done


def slots_free(srv, n):
    """Wait until ``n`` model slots are free and no lease is held (the worker frees slots a tick later)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len(srv.state.model.slots.free) == n and srv.state.engine.leases == 0:
            return True
        time.sleep(0.05)
    return False


# ---- timestamps and the runtime's token bookkeeping ------------------------------------------------------
def test_engine_warm_up_leaves_every_slot_free_and_the_text_unchanged(artifact, offline):
    """The GPU start-up warm-up (one step at every batch size, largest first) drops its streams:
    afterwards every slot is free and a stream transcribes exactly as offline."""
    from voxc.server.engine import Engine

    model = voxc.load(artifact, max_streams=3)
    engine = Engine(model, 3)
    engine.warm_up()
    assert len(model.slots.free) == 3 and engine.warmup_seconds > 0
    pcm = clip(1)
    s = model.stream()
    assert s.feed(pcm) + s.finish() == offline(pcm)
    assert len(model.slots.free) == 3


def test_a_stream_without_kv_memory_ends_alone(artifact, offline):
    """Three streams at once on a decoder KV pool capped at 5 pages (each 2 s stream needs 2 of 64
    rows: its prompt's, then one more at position 64, so 6 in all): the stream that finds no page
    (whichever asks last, or one of three asking in the same step) ends with a one-line error naming
    the cache, the two others finish with their offline text, and every page comes back.

    The clients hold back their audio after 0.75 s until all three prompts hold their first page
    (without that gate the tiny model finished a stream, and gave its pages back, before the third
    had connected: all three then fit)."""
    model = voxc.load(artifact, max_streams=3, kv_pages=1)
    pool = model.kv["dec_cache"]
    pool.max_pages = 5
    pcms = [clip(i) for i in range(3)]
    with ServerThread(model, ServerConfig(max_sessions=3)) as srv:
        async def all_prompts_hold_a_page():
            deadline = time.monotonic() + 30
            while pool.pages_in_use < 3:
                assert time.monotonic() < deadline, f"{pool.pages_in_use} of 3 prompts hold a page"
                await asyncio.sleep(0.01)

        async def main():
            return await asyncio.gather(*(vllm_client(srv.url, p, gate=(12000, all_prompts_hold_a_page))
                                          for p in pcms))

        results = run(main())
        assert slots_free(srv, 3)
    errors = [i for i, events in enumerate(results) if events[-1]["type"] == "error"]
    assert len(errors) == 1, [events[-1] for events in results]
    message = results[errors[0]][-1]["error"]
    assert "\n" not in message and "the decoder's KV cache is full" in message, message
    for i, events in enumerate(results):
        if i not in errors:
            check_transcript(events, offline(pcms[i]), len(pcms[i]) / 16000)
    assert model.kv_bytes_in_use == 0 and model.kv["dec_cache"].size == 5


def test_dropped_stream_frees_its_slot_once(artifact):
    model = voxc.load(artifact, max_streams=2)
    s = model.stream()
    s.feed(clip(0, 0.5))
    s.drop()
    s.drop()
    assert len(model.slots.free) == 2 and s.finished
    with pytest.raises(voxc.VoxcError, match="finished"):
        s.feed(clip(0, 0.5))


def test_token_span_rule():
    # left pad 32, delay 6: the prompt is 39 positions; the first chosen token is the output of
    # position 38 and covers the client's first 80 ms
    assert token_span(38, left_pad_tokens=32, delay_tokens=6) == (0.0, 0.08)
    assert token_span(38 + 25, left_pad_tokens=32, delay_tokens=6) == (2.0, 2.08)
    assert token_span(76 + 30 + 12, left_pad_tokens=76, delay_tokens=30) == (0.96, 1.04)
    assert token_span(38 + 100, left_pad_tokens=32, delay_tokens=6, duration=5.0) == (5.0, 5.0)   # right padding
    with pytest.raises(ValueError):
        token_span(37, left_pad_tokens=32, delay_tokens=6)


def test_segmenter_and_subtitles():
    seg = Segmenter()
    for text, start in [(" Hello", 0.0), (" world.", 0.4), (" Next", 0.56), (" one", 0.64), (" later", 2.0)]:
        seg.push(Piece(text, start, round(start + 0.08, 3)))
    assert [(s.text, s.start, s.end) for s in seg.segments] == [
        (" Hello world.", 0.0, 0.48), (" Next one", 0.56, 0.72), (" later", 2.0, 2.08)]
    assert to_srt(seg.segments).startswith("1\n00:00:00,000 --> 00:00:00,480\nHello world.\n\n2\n")
    assert to_vtt(seg.segments).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.480\nHello world.\n")


def test_session_keeps_recent_tokens_and_positions(artifact, monkeypatch):
    model = voxc.load(artifact)
    pcm = clip(0, 3.0)
    full = model.stream()
    text = full.feed(pcm) + full.finish()
    assert full.token_count == len(full.tokens) > 8

    monkeypatch.setattr(session_mod, "TOKEN_HISTORY", 8)
    s = model.stream()
    s.queue(pcm)
    session_mod.advance([s])
    pieces = s.take_pieces()
    rest = s.finish()
    assert s.tokens == full.tokens[-8:] and s.token_count == full.token_count
    assert "".join(t for t, _ in pieces) + rest == text
    positions = [q for _, q in pieces]
    assert positions == sorted(positions) and positions[0] >= len(s.prompt) - 1
    # every piece's position is the position whose output the token was: re-derive from the tokens
    first = len(s.prompt) - 1
    assert all(first <= q < first + full.token_count for q in positions)


# ---- realtime websocket ------------------------------------------------------------------------------
def test_eight_clients_both_protocols_get_the_offline_text(server, offline):
    pcms = [clip(i) for i in range(8)]
    expected = [offline(as_received(p)) for p in pcms]

    async def main():
        jobs = [vllm_client(server.url, p, chunk=1280 + 320 * i) if i % 2 == 0 else openai_client(server.url, p, chunk=900 * i)
                for i, p in enumerate(pcms)]
        return await asyncio.gather(*jobs)

    results = run(main())
    for i, (events, want, pcm) in enumerate(zip(results, expected, pcms)):
        done = check_transcript(events, want, len(pcm) / 16000)
        if i % 2 == 0:
            assert done["usage"]["prompt_tokens"] == 39 and done["usage"]["completion_tokens"] > 0
        else:
            assert done["usage"]["type"] == "tokens" and done["item_id"].startswith("item_")
            assert any(e["type"] == "input_audio_buffer.committed" and e["item_id"] == done["item_id"] for e in events)
    assert slots_free(server, 8)


def test_openai_24khz_default_and_beta_events(server, offline):
    from voxc.audio import load_audio

    t = np.arange(int(24000 * 2.1)) / 24000
    pcm24 = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * np.random.default_rng(7).standard_normal(t.shape)).astype(np.float32)
    want = offline(load_audio(as_received(pcm24), sample_rate=24000))

    async def beta():
        async with aiohttp.ClientSession() as http, http.ws_connect(
                server.url + "/v1/realtime?intent=transcription", headers={"OpenAI-Beta": "realtime=v1"}) as ws:
            assert (await next_event(ws))["type"] == "transcription_session.created"
            await ws.send_json({"type": "transcription_session.update",
                                "session": {"input_audio_format": "pcm16", "turn_detection": None}})
            assert (await next_event(ws))["type"] == "transcription_session.updated"
            for i in range(0, len(pcm24), 4800):
                await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(pcm24[i:i + 4800])})
            await ws.send_json({"type": "input_audio_buffer.commit"})
            return await until(ws, {OAI_DONE, "error"})

    check_transcript(run(openai_client(server.url, pcm24, rate=24000, chunk=4000)), want, 2.1)
    check_transcript(run(beta()), want, 2.1)


def test_openai_g711_and_delay_levels(server, offline):
    from voxc.audio import load_audio
    from voxc.server.protocol import decode_audio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop  # the stdlib's G.711 codec (Python < 3.13) checks voxc's tables
        raw = bytes(range(256))
        for law, expand in (("ulaw", audioop.ulaw2lin), ("alaw", audioop.alaw2lin)):
            want = np.frombuffer(expand(raw, 2), "<i2") / 32768
            assert np.array_equal(decode_audio(base64.b64encode(raw).decode(), law), want)
    except ImportError:
        pass
    ulaw = np.random.default_rng(11).integers(0, 256, 8000 * 2, dtype=np.uint8).tobytes()   # 2 s of noise at 8 kHz
    want = offline(load_audio(decode_audio(base64.b64encode(ulaw).decode(), "ulaw"), sample_rate=8000), 240)

    async def main():
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/v1/realtime?intent=transcription") as ws:
            await next_event(ws)
            await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcmu"}, "transcription": {"model": "voxtral", "delay": "low"}}}}})
            updated = await next_event(ws)
            await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "transcription": {"delay": "sometime"}}}}})
            bad = await next_event(ws)
            for i in range(0, len(ulaw), 1000):
                await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(ulaw[i:i + 1000]).decode()})
            await ws.send_json({"type": "input_audio_buffer.commit"})
            return updated, bad, await until(ws, {OAI_DONE, "error"})

    updated, bad, events = run(main())
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu", "rate": 8000}
    assert updated["session"]["delay_ms"] == 240
    assert bad["type"] == "error" and bad["error"]["code"] == "invalid_delay"
    check_transcript(events, want, 2.0)


def test_vllm_utterances_delay_and_detection_without_update(server, offline):
    a, b = clip(1), clip(2, 1.5)

    async def main():
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/v1/realtime") as ws:
            await next_event(ws)
            await ws.send_json({"type": "session.update", "session": {"delay_ms": 500}})
            bad = await next_event(ws)
            await ws.send_json({"type": "session.update", "session": {"delay_ms": 240}})
            out = [bad]
            for pcm in (a, b):          # two utterances on one connection, no session.update model needed
                for i in range(0, len(pcm), 3200):
                    await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(pcm[i:i + 3200])})
                await ws.send_json({"type": "input_audio_buffer.commit", "final": True})
                out.append(await until(ws, {VLLM_DONE, "error"}))
            await ws.send_json({"type": "input_audio_buffer.commit", "final": True})   # nothing appended
            out.append(await next_event(ws))
            return out

    bad, first, second, empty = run(main())
    assert bad["type"] == "error" and bad["code"] == "invalid_delay" and "500" in bad["error"]
    check_transcript(first, offline(as_received(a), 240), len(a) / 16000)
    check_transcript(second, offline(as_received(b), 240), len(b) / 16000)
    assert first[-1]["usage"]["prompt_tokens"] == 1 + 32 + 3
    assert empty["type"] == VLLM_DONE and empty["text"] == ""


def test_client_vanishing_mid_stream_frees_its_slot(server, offline):
    pcms = [clip(i + 3, 2.5) for i in range(3)]
    expected = [offline(as_received(p)) for p in pcms]

    async def vanish():
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(server.url + "/v1/realtime")
        await next_event(ws)
        gone = clip(9, 6.0)
        for i in range(0, len(gone) // 2, 1600):
            await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(gone[i:i + 1600])})
        await asyncio.sleep(0.3)
        ws._response.connection.transport.abort()      # no close frame: the TCP connection just dies
        await http.close()

    async def main():
        jobs = [vllm_client(server.url, p, chunk=1600, pace=0.005) for p in pcms]
        return await asyncio.gather(vanish(), *jobs)

    _, *results = run(main())
    for events, want, pcm in zip(results, expected, pcms):
        check_transcript(events, want, len(pcm) / 16000)
    assert slots_free(server, 8)


def test_bad_events_get_errors_and_the_session_goes_on(server, offline):
    pcm = clip(4)
    want = offline(as_received(pcm))

    async def main():
        errors = []
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/v1/realtime") as ws:
            await next_event(ws)
            for bad in ["{not json", "[1, 2]", json.dumps({"type": 7}), json.dumps({"type": "response.create"}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": "%%%not base64%%%"}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": 12}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (80 << 10)})]:
                await ws.send_str(bad)
                errors.append(await next_event(ws))
            await ws.send_bytes(b"\x00\x01")
            errors.append(await next_event(ws))
            for i in range(0, len(pcm), 1600):
                await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(pcm[i:i + 1600])})
                if i == 3200:
                    await ws.send_str("{oops")
            await ws.send_json({"type": "input_audio_buffer.commit", "final": True})
            return errors, await until(ws, {VLLM_DONE})

    errors, events = run(main())
    assert [e["type"] for e in errors] == ["error"] * 9
    assert [e["code"] for e in errors] == ["invalid_json", "invalid_event", "invalid_event", "unknown_event",
                                           "invalid_audio", "invalid_audio", "invalid_audio", "message_too_large",
                                           "invalid_event"]
    assert "16-bit" in errors[5]["error"]
    assert [e["code"] for e in events if e["type"] == "error"] == ["invalid_json"]
    check_transcript([e for e in events if e["type"] != "error"], want, len(pcm) / 16000)

    async def too_big():         # over the transport limit: the connection is closed with 1009
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/v1/realtime") as ws:
            await next_event(ws)
            await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(clip(5))})
            await ws.send_str("x" * (300 << 10))
            while (msg := await ws.receive(timeout=20)).type == aiohttp.WSMsgType.TEXT:
                pass
            return msg, ws.close_code

    msg, code = run(too_big())
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and code == 1009
    assert slots_free(server, 8)
    health = run(get_json(server.url + "/health"))
    assert health["status"] == "ok" and health["sessions"] == 0


async def get_json(url):
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return await r.json()


def test_full_server_refuses_and_idle_sessions_are_closed(artifact, offline):
    model = voxc.load(artifact, max_streams=2)
    pcm = clip(6, 1.5)
    want = offline(as_received(pcm))
    with ServerThread(model, ServerConfig(max_sessions=2, idle_timeout=1.5)) as srv:
        async def main():
            http = aiohttp.ClientSession()
            held = [await http.ws_connect(srv.url + "/v1/realtime") for _ in range(2)]
            for ws in held:
                await next_event(ws)
                await ws.send_json({"type": "input_audio_buffer.append", "audio": b64(pcm[:3200])})
            third = await http.ws_connect(srv.url + "/v1/realtime")
            refusal = await next_event(third)
            closed = await third.receive(timeout=10)
            form = aiohttp.FormData()
            form.add_field("file", wav_bytes(pcm), filename="a.wav")
            async with http.post(srv.url + "/v1/audio/transcriptions", data=form) as r:
                http_full = (r.status, await r.json())
            metrics = await (await http.get(srv.url + "/metrics?format=json")).json()
            await held[0].close()                       # one leaves: a new client gets in
            events = await vllm_client(srv.url, pcm)
            idle = await until(held[1], {"error"}, timeout=20)   # the other stayed idle
            after_idle = await held[1].receive(timeout=10)
            await http.close()
            return refusal, closed, third.close_code, http_full, metrics, events, idle[-1], after_idle

        refusal, closed, code, http_full, metrics, events, idle, after_idle = run(main())
        assert refusal == {"type": "error", "code": "server_full", "error": refusal["error"]}
        assert "2 sessions" in refusal["error"] and code == 1013
        assert http_full[0] == 503 and http_full[1]["error"]["code"] == "server_full"
        assert metrics["sessions"] == 2 and metrics["sessions_refused_total"] == 2
        check_transcript(events, want, len(pcm) / 16000)
        assert idle["code"] == "idle_timeout"
        assert after_idle.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert slots_free(srv, 2)
        assert srv.state.idle_timeouts_total == 1


# ---- HTTP ---------------------------------------------------------------------------------------------
def wav_bytes(pcm: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, pcm, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_http_transcription_equals_offline(server, offline):
    from voxc.audio import load_audio

    pcm = clip(7, 2.5)
    t = np.arange(int(44100 * 1.7)) / 44100
    pcm44 = (0.3 * np.sin(2 * np.pi * 523 * t)).astype(np.float32)
    want16 = offline(load_audio(as_received(pcm), sample_rate=16000))
    want44 = offline(load_audio(np.frombuffer(pcm16(pcm44), "<i2"), sample_rate=44100))

    async def post(data: bytes, filename="clip.wav", **fields):
        form = aiohttp.FormData()
        form.add_field("file", data, filename=filename, content_type="audio/wav")
        for k, v in fields.items():
            form.add_field(k, v)
        async with aiohttp.ClientSession() as http, http.post(server.url + "/v1/audio/transcriptions", data=form) as r:
            body = await r.text()
            return r.status, r.content_type, body

    async def main():
        return await asyncio.gather(
            post(wav_bytes(pcm), model="voxtral"), post(wav_bytes(pcm44, 44100), response_format="text"),
            post(wav_bytes(pcm), response_format="verbose_json"), post(wav_bytes(pcm), response_format="srt"),
            post(b"RIFF not really a wav", filename="bad.wav"), post(wav_bytes(pcm), response_format="xml"),
            post(wav_bytes(pcm), delay_ms="123"))

    ok, text, verbose, srt, bad, bad_fmt, bad_delay = run(main())
    assert ok[0] == 200 and json.loads(ok[2])["text"] == want16
    assert text[:2] == (200, "text/plain") and text[2] == want44
    body = json.loads(verbose[2])
    assert body["text"] == want16 and body["duration"] == pytest.approx(2.5 + 0.17 * 7, abs=1e-3)
    assert "".join(s["text"] for s in body["segments"]) == want16
    assert srt[0] == 200 and srt[2].startswith("1\n00:00:00,")
    assert bad[0] == 400 and json.loads(bad[2])["error"]["code"] == "invalid_audio"
    assert bad_fmt[0] == 400 and json.loads(bad_fmt[2])["error"]["param"] == "response_format"
    assert bad_delay[0] == 400 and json.loads(bad_delay[2])["error"]["code"] == "invalid_delay"


def test_health_models_and_metrics(server):
    async def main():
        async with aiohttp.ClientSession() as http:
            health = await (await http.get(server.url + "/health")).json()
            models = await (await http.get(server.url + "/v1/models")).json()
            prom = await (await http.get(server.url + "/metrics")).text()
            return health, models, prom

    health, models, prom = run(main())
    assert health["status"] == "ok" and health["max_sessions"] == 8 and health["target"] == "llvm"
    assert models["data"][0]["id"] == health["model"]
    assert 'voxc_step_seconds{quantile="0.99"}' in prom and "\nvoxc_tokens_total " in prom
    values = dict(line.split(" ", 1) for line in prom.splitlines() if line and not line.startswith("#"))
    assert float(values["voxc_tokens_total"]) > 0 and float(values['voxc_step_seconds{quantile="0.5"}']) > 0
    # the KV pages: a pool is allocated, and the bytes in use are those the live streams hold
    model = server.state.model
    assert float(values["voxc_kv_bytes_allocated"]) >= float(values["voxc_kv_bytes_in_use"]) >= 0
    assert float(values["voxc_kv_bytes_allocated"]) <= sum(p.max_bytes for p in model.kv.values())


# ---- load test -----------------------------------------------------------------------------------------
def test_server_load_bench_local(artifact):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import server_load
    finally:
        sys.path.remove(str(ROOT / "bench"))
    report = server_load.main(["--local", "--artifact", str(artifact), "--clients", "3", "--seconds", "2",
                               "--pace", "realtime", "--json"])
    assert report["ok"], report
    assert report["sessions_held"] == 3 and report["lost"] == 0 and report["errors"] == 0
    assert report["latency_s"]["p50"] > 0 and report["deltas"] > 0
    assert report["server"]["kv_bytes_allocated"] >= report["server"]["kv_bytes_in_use"] >= 0


def test_server_load_samples_gpu_memory(tmp_path, monkeypatch):
    """The load bench's memory samples parse nvidia-smi's answer (a stand-in here) and stop when cancelled."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import server_load
    finally:
        sys.path.remove(str(ROOT / "bench"))
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 12345\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert server_load.gpu_memory_used_mib() == 12345

    async def sample_for(seconds):
        samples = []
        task = asyncio.create_task(server_load.sample_gpu_memory(samples, every_s=0.1))
        await asyncio.sleep(seconds)
        task.cancel()
        return samples

    samples = asyncio.run(sample_for(0.5))
    assert len(samples) >= 2 and all(used == 12345 for _, used in samples)
    fake.write_text("#!/bin/sh\necho 'No devices were found'\n")
    assert server_load.gpu_memory_used_mib() is None


# ---- other front ends: an ASGI server, and Ray Serve replicas (optional packages) --------------------------
def _optional(*modules):
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'ray[serve]' python-multipart)")


async def _both_protocols_and_http(url, pcms):
    jobs = [vllm_client(url, p) if i % 2 == 0 else openai_client(url, p) for i, p in enumerate(pcms)]
    results = await asyncio.gather(*jobs)
    form = aiohttp.FormData()
    form.add_field("file", wav_bytes(pcms[0]), filename="a.wav")
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/audio/transcriptions", data=form) as r:
            text = (r.status, (await r.json())["text"])
        health = await (await http.get(url + "/health")).json()
    return results, text, health


def test_asgi_app_under_uvicorn(artifact, offline):
    _optional("starlette", "uvicorn", "python_multipart")
    import socket
    import threading

    import uvicorn

    from voxc.server.app import ServerState
    from voxc.server.asgi import build_asgi_app

    state = ServerState(voxc.load(artifact, max_streams=2), ServerConfig(max_sessions=2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_asgi_app(state, 1 << 20), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        pcms = [clip(i, 1.5) for i in range(2)]
        results, (status, text), health = run(_both_protocols_and_http(f"http://127.0.0.1:{port}", pcms))
    finally:
        server.should_exit = True
        thread.join(10)
        state.engine.stop()
    for events, pcm in zip(results, pcms):
        check_transcript(events, offline(as_received(pcm)), len(pcm) / 16000)
    assert status == 200 and text == offline(as_received(pcms[0]))
    assert health["status"] == "ok" and health["sessions"] == 0


def test_ray_serve_replicas_share_the_load(artifact, offline):
    """Two replicas of one session each, four clients at once: Ray queues the extra connections at its
    proxy until a replica's slot is free, and everybody gets the offline text."""
    _optional("ray", "starlette", "python_multipart")
    import socket

    import ray
    from ray import serve

    from voxc.server import ray_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app.deployment(artifact, max_sessions=1, num_replicas=2), route_prefix="/", name="voxc")
        pcms = [clip(i, 1.5) for i in range(4)]
        results, (status, text), health = run(_both_protocols_and_http(f"http://127.0.0.1:{port}", pcms))
    finally:
        serve.shutdown()
        ray.shutdown()
    for events, pcm in zip(results, pcms):
        check_transcript(events, offline(as_received(pcm)), len(pcm) / 16000)
    assert status == 200 and text == offline(as_received(pcms[0]))
    assert health["status"] == "ok" and health["max_sessions"] == 1


def test_ray_serve_autoscales_on_live_sessions(artifact):
    """`serve run voxc.server.ray_app:build ... min_replicas= max_replicas=` autoscales on sessions:
    a websocket is one ongoing request, so the target is a share of each replica's slots."""
    _optional("ray", "starlette", "python_multipart")
    from voxc.server import ray_app

    app = ray_app.build({"artifact": str(artifact), "max_sessions": "16", "min_replicas": "1", "max_replicas": "4"})
    options = app._bound_deployment._deployment_config
    assert options.autoscaling_config.min_replicas == 1 and options.autoscaling_config.max_replicas == 4
    assert options.autoscaling_config.target_ongoing_requests == 12.0 and options.max_ongoing_requests == 16
    for bad, why in (({"num_replicas": "2", "max_replicas": "4"}, "not both"),
                     ({"min_replicas": "3", "max_replicas": "2"}, "min_replicas <= max_replicas"),
                     ({"target_fill": "0"}, "target_fill"), ({"replicas": "2"}, "unknown arguments")):
        with pytest.raises(ValueError, match=why):
            ray_app.build({"artifact": str(artifact), **bad})
