"""`voxc serve ARTIFACT`: the realtime transcription server."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve an artifact: realtime websocket (vLLM and OpenAI protocols) and file transcription",
        description="Serve a compiled artifact over HTTP. ws://HOST:PORT/v1/realtime speaks vLLM's realtime "
                    "transcription protocol, and OpenAI's (connect with ?intent=transcription); POST "
                    "/v1/audio/transcriptions transcribes a file (OpenAI's multipart form); /health and /metrics "
                    "report the server. All live sessions advance together in batched model steps.")
    p.add_argument("artifact", type=Path, help="artifact directory made by `voxc build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="sessions served at once, each holding a KV-cache slot (default 8); more are refused")
    p.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds a session may send nothing (while the server owes it no text) before it is "
                        "closed and its slot freed (default 120)")
    p.add_argument("--max-message-kb", type=int, default=1024,
                   help="largest websocket event in KiB (default 1024, about 24 s of 16 kHz audio); larger ones "
                        "get an error event, and frames over 4x this close the connection")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest file for /v1/audio/transcriptions")
    p.add_argument("--served-model-name", default=None,
                   help="model name reported to clients (default: the artifact directory's name)")
    p.add_argument("--kv-seconds", type=float, default=15.0,
                   help="seconds of audio per session the KV caches hold from the start (default 15, the "
                        "encoder's window: its cache never grows mid-session; 0: start small and grow as needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while loading")
    p.set_defaults(handler=run)


def run(args) -> int:
    import logging

    from voxc.errors import VoxcError
    from voxc.server.app import ServerConfig, serve

    if args.max_sessions < 1:
        raise VoxcError("--max-sessions must be at least 1")
    if args.idle_timeout <= 0:
        raise VoxcError("--idle-timeout must be positive")
    if not 1 <= args.port <= 65535:
        raise VoxcError("--port must be 1..65535")
    if not args.kv_seconds >= 0 or args.kv_seconds == float("inf"):
        raise VoxcError("--kv-seconds must be a number of seconds >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                          max_message_bytes=args.max_message_kb * 1024, max_upload_bytes=args.max_upload_mb << 20,
                          model_name=args.served_model_name, kv_seconds=args.kv_seconds or None)
    serve(args.artifact, host=args.host, port=args.port, config=config, progress=not args.quiet)
    return 0
