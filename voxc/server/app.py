"""The aiohttp application: realtime websocket, file transcription, health and metrics.

Endpoints:

* ``GET /v1/realtime`` (websocket): vLLM's or OpenAI's realtime transcription events (voxc.server.protocol).
* ``POST /v1/audio/transcriptions``: OpenAI's file transcription (multipart ``file``, optional ``model``,
  ``response_format`` json/text/verbose_json/srt/vtt, voxc's ``delay_ms``).
* ``GET /v1/models``: the one model served (OpenAI clients ask).
* ``GET /health``: 200 while the model worker runs (503 after it died), with session counts.
* ``GET /metrics``: Prometheus text (``?format=json`` for JSON): sessions, step latency percentiles,
  tokens per second, totals, the KV-cache bytes in use and allocated.

Each websocket connection and each HTTP transcription holds one of ``max_sessions`` leases while it
lasts; a full server answers a websocket with an ``error`` event (code ``server_full``) and closes it
with 1013 (try again later), an HTTP request with 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from voxc.errors import VoxcError
from voxc.server import protocol as P
from voxc.server.engine import Engine
from voxc.server.timestamps import Segmenter, to_srt, to_vtt

log = logging.getLogger("voxc.server")

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


@dataclass
class ServerConfig:
    max_sessions: int = 8
    idle_timeout: float = 120.0          # seconds without a client event (and no work pending) before closing
    max_message_bytes: int = 1 << 20     # larger websocket events get an error event (the session goes on)
    max_upload_bytes: int = 200 << 20    # file transcription upload limit
    model_name: str | None = None
    # The KV pools hold this many seconds of audio for every session from the start (voxc.load's
    # kv_seconds): 15 s is the encoder's whole window, which every session past 15 s holds, so its
    # pool never grows (a growth copies every layer's pool, a step of hundreds of ms at 192 sessions on
    # an H100); the decoder's grows past 15 s of a session.  None: start small and grow as sessions need.
    kv_seconds: float | None = 15.0

    @property
    def hard_message_bytes(self) -> int:
        """Above this the transport refuses the frame and closes the connection with 1009."""
        return 4 * self.max_message_bytes


class ServerState:
    def __init__(self, model, config: ServerConfig):
        self.model = model
        self.config = config
        self.engine = Engine(model, config.max_sessions)
        self.model_name = config.model_name or Path(model.artifact_dir).name
        self.default_delay_ms = model.default_delay_ms
        self.connections: set = set()
        self.idle_timeouts_total = 0
        self.started = time.time()


STATE = web.AppKey("voxc_state", ServerState)


def create_app(model, config: ServerConfig | None = None) -> web.Application:
    """The server for a loaded model (``voxc.load(artifact, max_streams=config.max_sessions)``)."""
    config = config or ServerConfig()
    state = ServerState(model, config)
    app = web.Application(client_max_size=1 << 20)
    app[STATE] = state
    app.router.add_get("/v1/realtime", realtime_handler)
    app.router.add_post("/v1/audio/transcriptions", transcriptions_handler)
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/metrics", metrics_handler)

    async def on_startup(app):
        state.engine.start(asyncio.get_running_loop())

    async def on_shutdown(app):
        for conn in list(state.connections):
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def on_cleanup(app):
        await asyncio.get_running_loop().run_in_executor(None, state.engine.stop)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


# ---- websocket ---------------------------------------------------------------------------------
class Utterance:
    """One stream of a connection: its item id, text so far and segments."""

    def __init__(self, conn: "Connection", codec: str, rate: int):
        self.conn = conn
        self.item_id = "item_" + uuid.uuid4().hex[:20]
        self.text: list[str] = []
        self.segments = Segmenter()
        self.stream = conn.state.engine.open(conn.delay_ms, self.on_output)
        self.resampler = None
        if rate != 16000:
            import soxr
            self.resampler = soxr.ResampleStream(rate, 16000, 1, dtype="float32", quality="HQ")
        self.codec = codec
        self.samples = 0

    def append(self, pcm: np.ndarray) -> None:
        self.samples += pcm.size                 # the client's samples (the resampler may hold some back)
        if self.resampler is not None:
            pcm = self.resampler.resample_chunk(pcm)
        self.stream.append(pcm)

    def end(self) -> None:
        if self.resampler is not None:
            tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if tail.size:
                self.stream.append(tail)
        self.stream.end()

    def on_output(self, out) -> None:
        conn = self.conn
        if out.error:
            conn.send(P.error_event(conn.protocol, f"transcription failed: {out.error}", "transcription_failed"))
            return
        if out.pieces:
            delta = "".join(p.text for p in out.pieces)
            self.text.append(delta)
            for piece in out.pieces:
                self.segments.push(piece)
            timing = {"start": out.pieces[0].start, "end": out.pieces[-1].end}
            if conn.protocol == P.OPENAI:
                conn.send({"type": "conversation.item.input_audio_transcription.delta", "event_id": P.event_id(),
                           "item_id": self.item_id, "content_index": 0, "delta": delta, **timing})
            else:
                conn.send({"type": "transcription.delta", "delta": delta, **timing})
        if out.done:
            text = "".join(self.text)
            extra = {"segments": self.segments.as_dicts(), "duration": round(out.duration, 3)}
            usage = out.usage
            if conn.protocol == P.OPENAI:
                conn.send({"type": "conversation.item.input_audio_transcription.completed", "event_id": P.event_id(),
                           "item_id": self.item_id, "content_index": 0, "transcript": text,
                           "usage": {"type": "tokens", "input_tokens": usage["prompt_tokens"],
                                     "output_tokens": usage["completion_tokens"],
                                     "total_tokens": usage["total_tokens"], "seconds": round(out.duration, 3)},
                           **extra})
            else:
                conn.send({"type": "transcription.done", "text": text, "usage": usage, **extra})


class Connection:
    """One websocket client.  ``ws`` is aiohttp's WebSocketResponse or anything with the same
    ``receive(timeout)``, ``send_str``, ``close(code, message)`` and ``closed`` (voxc.server.ray_app's
    ASGI adapter); ``query`` and ``headers`` are the upgrade request's."""

    def __init__(self, state: ServerState, ws, query, headers):
        self.state = state
        self.ws = ws
        self.protocol = P.OPENAI if query.get("intent") == "transcription" else None
        self.beta = "realtime=v1" in headers.get("OpenAI-Beta", "")
        self.id = "sess_" + uuid.uuid4().hex[:20]
        self.delay_ms = state.default_delay_ms
        self.format: tuple[str, int] | None = None   # client (codec, rate); None: the protocol's default
        self.model = state.model_name
        self.utterance: Utterance | None = None
        self.previous_item_id: str | None = None
        self._ending: list[Utterance] = []   # ended utterances whose final text has not come yet
        self._out: asyncio.Queue = asyncio.Queue()

    # ---- sending (one writer task keeps the events in order) ----------------------------------
    def send(self, event: dict) -> None:
        self._out.put_nowait(event)

    async def _writer(self) -> None:
        while True:
            event = await self._out.get()
            if event is None:
                return
            try:
                await self.ws.send_str(json.dumps(event, ensure_ascii=False))
            except (ConnectionError, RuntimeError):   # the client went away; the reader notices too
                return

    def error(self, message: str, code: str, event: dict | None = None) -> None:
        client_event_id = event.get("event_id") if isinstance(event, dict) else None
        self.send(P.error_event(self.protocol, message, code, client_event_id))

    # ---- the connection ----------------------------------------------------------------------
    async def run(self) -> None:
        state, engine = self.state, self.state.engine
        if not engine.try_lease():
            await self.ws.send_str(json.dumps(P.error_event(
                self.protocol, f"the server is full: all {state.config.max_sessions} sessions are in use; "
                               f"try again later", "server_full")))
            await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"server full")
            return
        state.connections.add(self)
        writer = asyncio.create_task(self._writer())
        try:
            self.send(P.created_event(self._session_object(), beta=self.beta and self.protocol == P.OPENAI))
            while True:
                msg = await self._receive()
                if msg is None:
                    break
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self.error("binary frames are not part of the protocol: send JSON text events "
                               "(audio as base64 in input_audio_buffer.append)", "invalid_event")
                else:   # CLOSE, CLOSING, CLOSED, ERROR (a frame over the transport limit: closed with 1009)
                    break
        finally:
            state.connections.discard(self)
            for u in [self.utterance, *self._ending]:   # a client gone mid-stream: free its slot now
                if u is not None and not u.stream.finished:
                    u.stream.abort()
            self.utterance, self._ending = None, []
            engine.release_lease()
            self.send(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            if not writer.done():
                writer.cancel()
            if not self.ws.closed:
                await self.ws.close()

    async def _receive(self):
        """The next message; None when the client closed or stayed idle too long."""
        timeout = self.state.config.idle_timeout
        while True:
            try:
                return await self.ws.receive(timeout=timeout)
            except asyncio.TimeoutError:
                if self._owes_text():
                    continue          # the server still owes this client text: not idle
                self.state.idle_timeouts_total += 1
                self.error(f"no event for {timeout:g} s: the session was closed and its slot freed", "idle_timeout")
                return None

    def _owes_text(self) -> bool:
        current = self.utterance is not None and self.utterance.stream.busy
        return current or any(not u.stream.finished for u in self._ending)

    async def _on_text(self, data: str) -> None:
        if len(data) > self.state.config.max_message_bytes:
            self.error(f"event of {len(data)} bytes is larger than the limit of {self.state.config.max_message_bytes}; "
                       f"send audio in smaller appends", "message_too_large")
            return
        try:
            event = json.loads(data)
        except (json.JSONDecodeError, ValueError) as exc:
            self.error(f"invalid JSON: {exc}", "invalid_json")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.error("an event must be a JSON object with a string 'type'", "invalid_event", event)
            return
        if self.protocol is None:
            self.protocol = P.detect_protocol(event)
        kind = event["type"]
        try:
            if kind in ("session.update", "transcription_session.update"):
                self._update(event)
            elif kind == "input_audio_buffer.append":
                await self._append(event)
            elif kind == "input_audio_buffer.commit":
                self._commit(event)
            elif kind == "input_audio_buffer.clear":
                self._clear()
            else:
                self.error(f"unknown event type {kind!r}", "unknown_event", event)
        except VoxcError as exc:
            code = "invalid_audio" if kind == "input_audio_buffer.append" else "invalid_event"
            self.error(str(exc), code, event)

    def _session_object(self) -> dict:
        codec, rate = self._input_format()
        return P.session_object(self.id, model=self.model, delay_ms=self.delay_ms, codec=codec, rate=rate,
                                protocol=self.protocol)

    def _update(self, event: dict) -> None:
        try:
            delay = P.find_delay_ms(event)
        except VoxcError as exc:
            self.error(str(exc), "invalid_delay", event)
            return
        fmt = P.find_input_format(event) if self.protocol == P.OPENAI else None
        if delay is not None:
            try:
                self.state.model.delay_tokens(delay)   # a fixed-delay artifact refuses others here
            except VoxcError as exc:
                self.error(str(exc), "invalid_delay", event)
                return
            self.delay_ms = int(delay)
        if fmt is not None:
            self.format = fmt
        model = event.get("model")
        if isinstance(model, str):
            self.model = model
        if self.protocol == P.OPENAI:
            kind = "transcription_session.updated" if event["type"] == "transcription_session.update" \
                else "session.updated"
            self.send({"type": kind, "event_id": P.event_id(), "session": self._session_object()})

    def _input_format(self) -> tuple[str, int]:
        return self.format or ("pcm16", P.OPENAI_DEFAULT_RATE if self.protocol == P.OPENAI else P.VLLM_RATE)

    async def _append(self, event: dict) -> None:
        codec = self.utterance.codec if self.utterance is not None else self._input_format()[0]
        pcm = P.decode_audio(event.get("audio"), codec)
        if pcm.size == 0:
            return
        if self.utterance is None:
            self.utterance = Utterance(self, *self._input_format())
        self.utterance.append(pcm)
        await self.utterance.stream.wait_room()

    def _commit(self, event: dict) -> None:
        if self.protocol == P.OPENAI:
            if self.utterance is None or self.utterance.samples == 0:
                self.error("the input audio buffer is empty: append audio before committing",
                           "input_audio_buffer_commit_empty", event)
                return
            u = self._end_utterance()
            self.send({"type": "input_audio_buffer.committed", "event_id": P.event_id(),
                       "previous_item_id": self.previous_item_id, "item_id": u.item_id})
            self.previous_item_id = u.item_id
            return
        if not event.get("final"):
            if self.utterance is None:      # vLLM: a commit starts the utterance
                self.utterance = Utterance(self, *self._input_format())
            return
        if self.utterance is None:
            self.send({"type": "transcription.done", "text": "", "segments": [], "duration": 0.0,
                       "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
            return
        self._end_utterance()

    def _end_utterance(self) -> Utterance:
        u, self.utterance = self.utterance, None
        u.end()
        self._ending = [x for x in self._ending if not x.stream.finished] + [u]
        return u

    def _clear(self) -> None:
        if self.utterance is not None:
            self.utterance.stream.abort()
            self.utterance = None
        self.send({"type": "input_audio_buffer.cleared", "event_id": P.event_id()})


async def realtime_handler(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    ws = web.WebSocketResponse(max_msg_size=state.config.hard_message_bytes, heartbeat=None)
    await ws.prepare(request)
    await Connection(state, ws, request.query, request.headers).run()
    return ws


# ---- file transcription ------------------------------------------------------------------------
@dataclass
class Reply:
    """An HTTP answer, independent of the web framework serving it."""
    status: int
    content_type: str
    body: str

    @classmethod
    def error(cls, status: int, message: str, code: str, param: str | None = None) -> "Reply":
        kind = "invalid_request_error" if status < 500 else "server_error"
        return cls(status, "application/json", _dumps({"error": {"message": message, "type": kind, "param": param,
                                                                  "code": code}}))


async def transcriptions_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not request.content_type.startswith("multipart/"):
        return _response(Reply.error(400, "send the audio as multipart/form-data with a 'file' field",
                                     "invalid_request"))
    fields: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="voxc-upload-") as tmp:
        upload = None
        reader = await request.multipart()
        async for part in reader:
            if part.name == "file":
                upload = Path(tmp) / f"upload{Path(part.filename or 'audio').suffix[:16]}"
                size = 0
                with open(upload, "wb") as f:
                    while chunk := await part.read_chunk(1 << 16):
                        size += len(chunk)
                        if size > state.config.max_upload_bytes:
                            return _response(Reply.error(413, f"the file is larger than {state.config.max_upload_bytes}"
                                                              f" bytes", "file_too_large", "file"))
                        f.write(chunk)
            elif part.name:
                value = await part.read(decode=True)
                if len(value) > 4096:
                    return _response(Reply.error(400, f"form field {part.name!r} is too long", "invalid_request",
                                                 part.name))
                fields[part.name] = value.decode("utf-8", errors="replace")
        return _response(await transcribe_upload(state, upload, fields))


def _response(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, text=reply.body, content_type=reply.content_type)


async def transcribe_upload(state: ServerState, upload: Path | None, fields: dict[str, str]) -> Reply:
    """OpenAI's /v1/audio/transcriptions on an uploaded file (``fields``: the other form fields)."""
    if upload is None:
        return Reply.error(400, "the form has no 'file' field with the audio", "invalid_request", "file")
    fmt = fields.get("response_format", "json")
    if fmt not in RESPONSE_FORMATS:
        return Reply.error(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
                           "invalid_request", "response_format")
    delay_ms = state.default_delay_ms
    if "delay_ms" in fields:
        try:
            delay_ms = int(fields["delay_ms"])
            state.model.delay_tokens(delay_ms)
        except (ValueError, VoxcError) as exc:
            return Reply.error(400, str(exc), "invalid_delay", "delay_ms")
    from voxc.audio import load_audio
    try:
        pcm = await asyncio.get_running_loop().run_in_executor(None, load_audio, str(upload))
    except VoxcError as exc:
        return Reply.error(400, str(exc).replace(str(upload), repr(upload.name)), "invalid_audio", "file")

    engine = state.engine
    if not engine.try_lease():
        return Reply.error(503, f"the server is full: all {state.config.max_sessions} sessions are in use; "
                                f"try again later", "server_full")
    done = asyncio.get_running_loop().create_future()
    pieces, segmenter = [], Segmenter()

    def on_output(out):
        if out.error:
            if not done.done():
                done.set_exception(VoxcError(out.error))
            return
        for piece in out.pieces:
            pieces.append(piece.text)
            segmenter.push(piece)
        if out.done and not done.done():
            done.set_result(out)

    stream = engine.open(delay_ms, on_output)
    try:
        stream.append(pcm)
        stream.end()
        out = await done
    except VoxcError as exc:
        return Reply.error(500, f"transcription failed: {exc}", "server_error")
    finally:
        if not stream.finished:
            stream.abort()
        engine.release_lease()
    text = "".join(pieces)
    duration = round(out.duration, 3)
    if fmt == "text":
        return Reply(200, "text/plain", text)
    if fmt == "srt":
        return Reply(200, "application/x-subrip", to_srt(segmenter.segments))
    if fmt == "vtt":
        return Reply(200, "text/vtt", to_vtt(segmenter.segments))
    usage = {"type": "duration", "seconds": duration}
    if fmt == "json":
        return Reply(200, "application/json", _dumps({"text": text, "usage": usage}))
    segments = [{**s, "seek": 0} for s in segmenter.as_dicts()]
    return Reply(200, "application/json", _dumps({"task": "transcribe", "language": None, "duration": duration,
                                                  "text": text, "segments": segments, "usage": usage}))


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


# ---- models, health, metrics ---------------------------------------------------------------------
async def models_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "voxc"}]})


def _status(state: ServerState) -> dict:
    engine = state.engine
    return {"model": state.model_name, "target": state.model.manifest.get("target"),
            "sessions": engine.leases, "max_sessions": state.config.max_sessions,
            "active_streams": engine.active_streams(), "uptime_s": round(time.time() - state.started, 1)}


def health(state: ServerState) -> tuple[int, dict]:
    engine = state.engine
    if engine.worker_error is not None or not engine.alive:
        return 503, {"status": "error", "error": "the model worker is not running", **_status(state)}
    return 200, {"status": "ok", **_status(state)}


async def health_handler(request: web.Request) -> web.Response:
    status, body = health(request.app[STATE])
    return web.json_response(body, status=status)


def metrics(state: ServerState) -> dict:
    engine = state.engine
    batch = list(engine.tick_batch)
    return {**_status(state),
            "step_seconds": engine.step_percentiles(), "steps_total": engine.ticks_total,
            "step_batch_mean": float(np.mean(batch)) if batch else 0.0,
            "tokens_total": engine.tokens_total, "tokens_per_second": round(engine.tokens_per_second(), 3),
            "audio_seconds_total": round(engine.audio_seconds_total, 3),
            "sessions_total": engine.sessions_total, "sessions_refused_total": engine.refused_total,
            "stream_errors_total": engine.stream_errors_total, "idle_timeouts_total": state.idle_timeouts_total,
            "kv_bytes_in_use": state.model.kv_bytes_in_use, "kv_bytes_allocated": state.model.kv_bytes_allocated}


_PROMETHEUS = [
    ("sessions", "gauge", "connections holding a session (websocket or HTTP request)"),
    ("max_sessions", "gauge", "sessions the server admits at once"),
    ("active_streams", "gauge", "streams holding a model slot"),
    ("steps_total", "counter", "model ticks run (one batched advance over all streams with work)"),
    ("step_batch_mean", "gauge", "mean streams per tick over the recent ticks"),
    ("tokens_total", "counter", "tokens decoded"),
    ("tokens_per_second", "gauge", "tokens decoded per second over the last 10 s"),
    ("audio_seconds_total", "counter", "seconds of client audio queued to the model"),
    ("sessions_total", "counter", "sessions admitted"),
    ("sessions_refused_total", "counter", "sessions refused because the server was full"),
    ("stream_errors_total", "counter", "streams that failed in the model"),
    ("idle_timeouts_total", "counter", "sessions closed for being idle"),
    ("kv_bytes_in_use", "gauge", "bytes of KV-cache pages the streams hold (both towers, all layers)"),
    ("kv_bytes_allocated", "gauge", "bytes of the KV-cache page pools on the device (they grow on demand)"),
    ("uptime_s", "gauge", "seconds since the server started"),
]


def prometheus_text(m: dict) -> str:
    lines = []
    for name, kind, help_ in _PROMETHEUS:
        lines += [f"# HELP voxc_{name} {help_}", f"# TYPE voxc_{name} {kind}", f"voxc_{name} {m[name]}"]
    lines += ["# HELP voxc_step_seconds duration of a model tick over the recent ticks",
              "# TYPE voxc_step_seconds summary"]
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        lines.append(f'voxc_step_seconds{{quantile="{q}"}} {m["step_seconds"][key]:.6f}')
    return "\n".join(lines) + "\n"


def wants_json(query, headers) -> bool:
    return query.get("format") == "json" or "application/json" in headers.get("Accept", "")


async def metrics_handler(request: web.Request) -> web.Response:
    m = metrics(request.app[STATE])
    if wants_json(request.query, request.headers):
        return web.json_response(m)
    return web.Response(text=prometheus_text(m), content_type="text/plain")


# ---- running it ------------------------------------------------------------------------------------
def serve(artifact, *, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          progress: bool = True) -> None:
    """Load ``artifact`` and serve it until interrupted (``voxc serve``)."""
    import voxc

    config = config or ServerConfig()
    model = voxc.load(artifact, max_streams=config.max_sessions, progress=progress, kv_seconds=config.kv_seconds)
    app = create_app(model, config)
    print(f"voxc: serving {artifact} on http://{host}:{port} (websocket ws://{host}:{port}/v1/realtime, "
          f"{config.max_sessions} sessions)", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)


class ServerThread:
    """The server on a background thread with its own event loop (tests, ``bench/server_load.py --local``).

    ``with ServerThread(model, config) as server: server.url`` (an ephemeral port on 127.0.0.1)."""

    def __init__(self, model, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.app = create_app(model, config)
        self.host, self.port = host, port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="voxc-server", daemon=True)

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self.app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
