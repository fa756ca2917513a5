"""voxc's realtime transcription server (``voxc serve``).

One process, one loaded model, any number of clients up to ``--max-sessions``: every live stream
advances in the same batched model steps (voxc.server.engine), on a worker thread so the event loop
never blocks.  The websocket ``/v1/realtime`` speaks vLLM's and OpenAI's realtime transcription
events (voxc.server.protocol), ``POST /v1/audio/transcriptions`` is OpenAI's file transcription, and
``/health`` and ``/metrics`` tell how it runs (voxc.server.app).  Text carries timestamps derived
from each token's decoder position (voxc.server.timestamps).

Built on aiohttp: one dependency gives the HTTP server, websockets (with per-message size limits and
backpressure) and the client the tests and ``bench/server_load.py`` use.
"""
