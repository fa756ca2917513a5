"""The two realtime protocols the websocket speaks, and the audio they carry.

**vLLM** (``vllm serve`` ``/v1/realtime``, what Voxtral Realtime's own examples use)::

    server  session.created        {"id", "created"}
    client  session.update         {"model": ...}                 (optional; no reply)
    client  input_audio_buffer.commit                             (starts an utterance)
    client  input_audio_buffer.append {"audio": base64 PCM16 16 kHz mono}
    server  transcription.delta    {"delta": text}
    client  input_audio_buffer.commit {"final": true}              (end of audio)
    server  transcription.done     {"text", "usage": {prompt_tokens, completion_tokens, total_tokens}}
    server  error                  {"error": message, "code": ...}

then the next utterance (commit or append again) on the same connection.

**OpenAI** realtime transcription (``/v1/realtime?intent=transcription``, GA and beta events)::

    server  session.created        {"session": {"type": "transcription", ...}}
            (transcription_session.created for a beta client, one that sends OpenAI-Beta: realtime=v1)
    client  session.update / transcription_session.update
    server  session.updated / transcription_session.updated
    client  input_audio_buffer.append {"audio": base64 PCM16 24 kHz, or the session's format: audio/pcm at
            any rate (16 kHz needs no resampling), G.711 audio/pcmu, audio/pcma (g711_ulaw, g711_alaw)}
    server  conversation.item.input_audio_transcription.delta {"item_id", "content_index", "delta"}
    client  input_audio_buffer.commit        -> server input_audio_buffer.committed {"item_id", ...}
    server  conversation.item.input_audio_transcription.completed {"item_id", "transcript", "usage"}
    client  input_audio_buffer.clear         -> server input_audio_buffer.cleared
    server  error                  {"error": {"type", "code", "message", "param", "event_id"}}

Which one a client speaks: ``?intent=transcription`` in the URL (OpenAI's documented way to open a
transcription session) means OpenAI.  Otherwise the first event that tells decides:
``transcription_session.update``, ``input_audio_buffer.clear``, or a ``session.update`` whose
``session`` has OpenAI's fields (``type``, ``audio``, ``input_audio_format``,
``input_audio_transcription``, ``turn_detection``, ...) mean OpenAI; ``session.update`` with a
top-level ``model``, or a ``commit`` with ``final`` mean vLLM; until then the server answers in
vLLM's events (its ``session.created`` also carries a ``session`` object, so either client reads it).

voxc's additions, in both: every delta carries ``start``/``end`` (seconds of the client's audio, see
voxc.server.timestamps), done/completed events carry ``segments`` and ``duration``; the
transcription delay is a session setting, ``session.update {"session": {"delay_ms": 480}}`` (or a
top-level ``delay_ms``), used from the next utterance on.  Turn detection is not done by the server:
the client commits (text streams before the commit anyway).
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid

import numpy as np

from voxc.errors import VoxcError

VLLM = "vllm"
OPENAI = "openai"

OPENAI_SESSION_KEYS = {"type", "audio", "input_audio_format", "input_audio_transcription", "turn_detection",
                       "input_audio_noise_reduction", "include", "modalities", "object"}
OPENAI_DEFAULT_RATE = 24000     # OpenAI's pcm16 / audio/pcm
VLLM_RATE = 16000


def event_id() -> str:
    return "event_" + uuid.uuid4().hex[:20]


def detect_protocol(event: dict) -> str | None:
    """The protocol an event reveals, or None if it could be either's."""
    kind = event.get("type")
    if kind in ("transcription_session.update", "input_audio_buffer.clear"):
        return OPENAI
    if kind == "session.update":
        session = event.get("session")
        if isinstance(session, dict) and OPENAI_SESSION_KEYS & session.keys():
            return OPENAI
        if "model" in event:
            return VLLM
    if kind == "input_audio_buffer.commit" and "final" in event:
        return VLLM
    return None


def decode_pcm16(data, max_samples: int | None = None) -> np.ndarray:
    """base64 little-endian PCM16 mono -> float32 in [-1, 1)."""
    if not isinstance(data, str):
        raise VoxcError("'audio' must be a base64 string of 16-bit PCM")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VoxcError(f"'audio' is not valid base64: {exc}") from None
    if len(raw) % 2:
        raise VoxcError(f"'audio' decodes to {len(raw)} bytes, not a whole number of 16-bit samples")
    if max_samples is not None and len(raw) // 2 > max_samples:
        raise VoxcError(f"'audio' holds {len(raw) // 2} samples, more than {max_samples} in one event")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


# OpenAI's transcription ``delay`` levels (audio.input.transcription.delay) as Voxtral delays
OPENAI_DELAYS_MS = {"minimal": 80, "low": 240, "medium": 480, "high": 960, "xhigh": 2400}


def find_delay_ms(event: dict):
    """The delay a session.update asks for, wherever a client put it (None if it did not): voxc's
    ``delay_ms`` (top level or in ``session``), or OpenAI's ``transcription.delay`` (a level of
    :data:`OPENAI_DELAYS_MS`, or milliseconds)."""
    session = event.get("session") if isinstance(event.get("session"), dict) else {}
    candidates = [event.get("delay_ms"), session.get("delay_ms")]
    audio_input = session.get("audio", {}).get("input", {}) if isinstance(session.get("audio"), dict) else {}
    for transcription in (session.get("input_audio_transcription"),
                          audio_input.get("transcription") if isinstance(audio_input, dict) else None):
        if isinstance(transcription, dict):
            candidates += [transcription.get("delay_ms"), transcription.get("delay")]
    value = next((c for c in candidates if c is not None), None)
    if isinstance(value, str):
        if value not in OPENAI_DELAYS_MS:
            raise VoxcError(f"delay {value!r} is not one of {', '.join(OPENAI_DELAYS_MS)} (or a number of ms)")
        return OPENAI_DELAYS_MS[value]
    return value


def find_input_format(event: dict) -> tuple[str, int] | None:
    """``(codec, rate)`` an OpenAI session.update declares (None if it does not): codec ``pcm16``,
    ``ulaw`` or ``alaw`` (G.711, 8 kHz)."""
    session = event.get("session") if isinstance(event.get("session"), dict) else {}
    fmt = session.get("input_audio_format")          # beta: "pcm16" | "g711_ulaw" | "g711_alaw"
    if fmt is not None:
        if isinstance(fmt, str):
            if fmt not in BETA_FORMATS:
                raise VoxcError(f"input_audio_format {fmt!r} is not supported: use {', '.join(BETA_FORMATS)}")
            return BETA_FORMATS[fmt]
        return _format_of(fmt)
    audio_input = session.get("audio", {}).get("input", {}) if isinstance(session.get("audio"), dict) else {}
    if isinstance(audio_input, dict) and audio_input.get("format") is not None:
        return _format_of(audio_input["format"])
    return None


BETA_FORMATS = {"pcm16": ("pcm16", OPENAI_DEFAULT_RATE), "g711_ulaw": ("ulaw", 8000), "g711_alaw": ("alaw", 8000)}
GA_FORMATS = {"audio/pcm": "pcm16", "pcm16": "pcm16", "audio/pcmu": "ulaw", "audio/pcma": "alaw"}


def _format_of(fmt) -> tuple[str, int]:
    if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") not in GA_FORMATS:
        raise VoxcError(f"audio format {fmt!r} is not supported: use audio/pcm (16-bit, any rate; 16000 needs no "
                        f"resampling), audio/pcmu or audio/pcma")
    codec = GA_FORMATS[fmt.get("type", "audio/pcm")]
    if codec != "pcm16":
        return codec, 8000
    rate = fmt.get("rate", OPENAI_DEFAULT_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 192000:
        raise VoxcError(f"audio rate {rate!r} is not supported: give a whole number of Hz, 8000..192000")
    return codec, rate


def _g711_tables() -> dict[str, np.ndarray]:
    """G.711 byte -> float sample, for mu-law and A-law (ITU-T G.711 expansion)."""
    b = np.arange(256, dtype=np.int32)
    u = ~b & 0xFF
    exponent, mantissa = (u >> 4) & 7, u & 0x0F
    ulaw = (((mantissa << 3) + 0x84) << exponent) - 0x84
    ulaw = np.where(u & 0x80, -ulaw, ulaw)
    a = b ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    alaw = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    alaw = np.where(a & 0x80, alaw, -alaw)
    return {"ulaw": (ulaw / 32768.0).astype(np.float32), "alaw": (alaw / 32768.0).astype(np.float32)}


_G711 = _g711_tables()


def decode_audio(data, codec: str = "pcm16") -> np.ndarray:
    """base64 audio of ``codec`` (pcm16 little-endian, or G.711 ulaw/alaw bytes) -> float32 mono."""
    if codec == "pcm16":
        return decode_pcm16(data)
    if not isinstance(data, str):
        raise VoxcError("'audio' must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VoxcError(f"'audio' is not valid base64: {exc}") from None
    return _G711[codec][np.frombuffer(raw, np.uint8)]


# ---- server events -----------------------------------------------------------------------------
def error_event(protocol: str | None, message: str, code: str, client_event_id=None) -> dict:
    if protocol == OPENAI:
        return {"type": "error", "event_id": event_id(),
                "error": {"type": "invalid_request_error" if code != "server_error" else "server_error",
                          "code": code, "message": message, "param": None, "event_id": client_event_id}}
    return {"type": "error", "error": message, "code": code}


def session_object(session_id: str, *, model: str, delay_ms: int, codec: str, rate: int,
                   protocol: str | None) -> dict:
    ga_type = {v: k for k, v in GA_FORMATS.items() if k.startswith("audio/")}[codec]
    beta = {v: k for k, v in BETA_FORMATS.items()}.get((codec, rate), {"type": ga_type, "rate": rate})
    return {"id": session_id, "object": "realtime.transcription_session", "type": "transcription",
            "model": model, "delay_ms": delay_ms,
            "audio": {"input": {"format": {"type": ga_type, "rate": rate},
                                "transcription": {"model": model, "delay_ms": delay_ms},
                                "turn_detection": None}},
            "input_audio_format": beta, "input_audio_transcription": {"model": model, "delay_ms": delay_ms},
            "turn_detection": None, "protocol": protocol}


def created_event(session: dict, *, beta: bool) -> dict:
    if beta:
        return {"type": "transcription_session.created", "event_id": event_id(), "session": session}
    return {"type": "session.created", "event_id": event_id(), "id": session["id"], "created": int(time.time()),
            "session": session}
