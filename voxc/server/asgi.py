"""voxc serve as an ASGI app (Starlette): what Ray Serve replicas run (voxc.server.ray_app), and what any
ASGI server (uvicorn, hypercorn) can serve.

The protocol code is voxc.server.app's: :class:`ASGIWebSocket` gives a Starlette websocket the part
of aiohttp's interface that ``Connection`` uses, and the routes call the same file transcription,
health and metrics functions.  Needs ``starlette`` and ``python-multipart`` (Starlette's form
parser, for file uploads); Ray Serve installs Starlette.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from aiohttp import WSMsgType

from voxc.server.app import Connection, Reply, ServerState, health, metrics, prometheus_text, transcribe_upload, wants_json


class _Message:
    __slots__ = ("type", "data")

    def __init__(self, type_, data):
        self.type, self.data = type_, data


class ASGIWebSocket:
    """A Starlette websocket with the part of aiohttp's WebSocketResponse that Connection uses."""

    def __init__(self, websocket):
        self._ws = websocket
        self.closed = False

    async def receive(self, timeout: float | None = None) -> _Message:
        if self.closed:
            return _Message(WSMsgType.CLOSED, None)
        message = await asyncio.wait_for(self._ws.receive(), timeout)
        if message["type"] == "websocket.receive":
            if message.get("text") is not None:
                return _Message(WSMsgType.TEXT, message["text"])
            return _Message(WSMsgType.BINARY, message.get("bytes"))
        self.closed = True              # websocket.disconnect
        return _Message(WSMsgType.CLOSE, message.get("code"))

    async def send_str(self, text: str) -> None:
        try:
            await self._ws.send_text(text)
        except Exception as exc:        # Starlette raises several kinds once the client is gone
            raise ConnectionError(str(exc)) from exc

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._ws.close(code=int(code), reason=message.decode(errors="replace"))
        except Exception:
            pass


def build_asgi_app(state: ServerState, max_upload_bytes: int):
    """A Starlette app with voxc serve's endpoints, on ``state`` (one loaded model and its engine)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute

    def started():
        if state.engine._thread is None:           # the engine posts results to the loop serving requests
            state.engine.start(asyncio.get_running_loop())

    async def realtime(websocket):
        started()
        await websocket.accept()
        await Connection(state, ASGIWebSocket(websocket), websocket.query_params, websocket.headers).run()

    async def transcriptions(request):
        started()
        if not request.headers.get("content-type", "").startswith("multipart/"):
            reply = Reply.error(400, "send the audio as multipart/form-data with a 'file' field", "invalid_request")
            return Response(reply.body, status_code=reply.status, media_type=reply.content_type)
        async with request.form(max_files=1, max_fields=32, max_part_size=max_upload_bytes) as form:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            upload_file = form.get("file")
            with tempfile.TemporaryDirectory(prefix="voxc-upload-") as tmp:
                upload = None
                if upload_file is not None and not isinstance(upload_file, str):
                    upload = Path(tmp) / f"upload{Path(upload_file.filename or 'audio').suffix[:16]}"
                    size = 0
                    with open(upload, "wb") as f:
                        while chunk := await upload_file.read(1 << 16):
                            size += len(chunk)
                            if size > max_upload_bytes:
                                reply = Reply.error(413, f"the file is larger than {max_upload_bytes} bytes",
                                                    "file_too_large", "file")
                                return Response(reply.body, status_code=reply.status, media_type=reply.content_type)
                            f.write(chunk)
                reply = await transcribe_upload(state, upload, fields)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    async def health_route(request):
        started()
        status, body = health(state)
        return JSONResponse(body, status_code=status)

    async def metrics_route(request):
        started()
        m = metrics(state)
        if wants_json(request.query_params, request.headers):
            return JSONResponse(m)
        return Response(prometheus_text(m), media_type="text/plain")

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "voxc"}]})

    return Starlette(routes=[
        WebSocketRoute("/v1/realtime", realtime),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/models", models), Route("/health", health_route), Route("/metrics", metrics_route),
    ])
