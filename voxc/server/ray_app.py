"""voxc serve on Ray Serve: the same server as replicas behind Ray's HTTP proxy, to scale out.

Each replica is what ``voxc serve`` is in one process: one loaded model with ``max_sessions`` slots,
one engine worker advancing all of its sessions in batched steps, and the same protocol code
(voxc.server.app's Connection, file transcription, health and metrics).  Ray's proxy terminates
HTTP and websockets and hands each connection to a replica as ASGI; voxc.server.asgi's Starlette app
(Ray Serve ships Starlette) adapts that to voxc's handlers.  More replicas (one per GPU, or
autoscaled) serve more concurrent streams.

    pip install "ray[serve]" python-multipart    # python-multipart: Starlette's form parser (file uploads)

    from voxc.server import ray_app
    from ray import serve
    serve.run(ray_app.deployment("./voxtral-cuda", max_sessions=16, num_replicas=4, num_gpus=1))

or from the command line: ``serve run voxc.server.ray_app:build artifact=./voxtral-cuda num_replicas=4
num_gpus=1``.  Endpoints and protocols are those of ``voxc serve`` (voxc.server.app), at ``route_prefix``.

Admission: Ray routes a new connection to a replica with fewer than ``max_ongoing_requests`` open
requests, and queues it at the proxy while all are busy (``max_queued_requests`` bounds that queue;
beyond it Ray answers 503).  A websocket counts as one request for its whole life, so the limit is
``max_sessions``: a replica never gets more connections than it has slots, and a client waits for a
free one instead of being refused.  /health and /metrics count too, so they wait as well while every
replica is full; Ray's own health check calls ``check_health`` directly.
"""
from __future__ import annotations

from pathlib import Path

from ray import serve

from voxc.server.app import ServerConfig, ServerState
from voxc.server.asgi import build_asgi_app

@serve.deployment
@serve.ingress()
class VoxcReplica:
    """One replica: a model with ``max_sessions`` slots and its engine."""

    def __init__(self, artifact: str, config: dict):
        import voxc

        self.config = ServerConfig(**config)
        model = voxc.load(artifact, max_streams=self.config.max_sessions, kv_seconds=self.config.kv_seconds)
        self.state = ServerState(model, self.config)

    def __serve_build_asgi_app__(self):
        return build_asgi_app(self.state, self.config.max_upload_bytes)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose model worker died."""
        engine = self.state.engine
        if engine.worker_error is not None or (engine._thread is not None and not engine.alive):
            raise RuntimeError("the voxc model worker stopped")

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.engine.stop()


def deployment(artifact, *, max_sessions: int = 8, idle_timeout: float = 120.0, max_message_bytes: int = 1 << 20,
               max_upload_bytes: int = 200 << 20, model_name: str | None = None, num_replicas: int | str = 1,
               num_gpus: float = 0.0, num_cpus: float = 1.0, autoscaling_config: dict | None = None,
               max_queued_requests: int = -1):
    """The bound Ray Serve application: ``serve.run(deployment(...), route_prefix="/")``.

    ``num_gpus=1`` puts each replica on its own GPU; ``autoscaling_config`` (Ray's: min_replicas,
    max_replicas, target_ongoing_requests, ...) replaces ``num_replicas``."""
    config = {"max_sessions": max_sessions, "idle_timeout": idle_timeout, "max_message_bytes": max_message_bytes,
              "max_upload_bytes": max_upload_bytes,
              "model_name": model_name or Path(artifact).name}
    options = {"max_ongoing_requests": max_sessions, "max_queued_requests": max_queued_requests,
               "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus}}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    return VoxcReplica.options(**options).bind(str(Path(artifact).resolve()), config)


def autoscaling(max_sessions: int, min_replicas: int = 1, max_replicas: int = 1, target_fill: float = 0.75) -> dict:
    """Ray's autoscaling_config for live sessions: a websocket is one ongoing request for its whole
    life, so Ray adds a replica when the replicas' sessions average more than ``target_fill`` of their
    slots, and removes one when they fall well below it."""
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}")
    if not 0 < target_fill <= 1:
        raise ValueError(f"target_fill must be in (0, 1], got {target_fill}")
    return {"min_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": max(1.0, target_fill * max_sessions)}


def build(args: dict):
    """``serve run voxc.server.ray_app:build artifact=DIR [max_sessions=8 num_replicas=2 num_gpus=1 ...]``;
    ``min_replicas=1 max_replicas=8 [target_fill=0.75]`` autoscale on live sessions instead."""
    args = dict(args)
    artifact = args.pop("artifact")
    kinds = {"max_sessions": int, "idle_timeout": float, "max_message_bytes": int, "max_upload_bytes": int,
             "num_gpus": float, "num_cpus": float, "model_name": str, "max_queued_requests": int}
    scaling = {"min_replicas": int, "max_replicas": int, "target_fill": float}
    unknown = set(args) - set(kinds) - set(scaling) - {"num_replicas"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}")
    kwargs = {k: kinds[k](v) for k, v in args.items() if k in kinds}
    if "num_replicas" in args:
        kwargs["num_replicas"] = args["num_replicas"] if args["num_replicas"] == "auto" else int(args["num_replicas"])
    if set(args) & set(scaling):
        if "num_replicas" in args:
            raise ValueError("give num_replicas or min_replicas/max_replicas (autoscaling), not both")
        kwargs["autoscaling_config"] = autoscaling(kwargs.get("max_sessions", 8),
                                                   **{k: scaling[k](v) for k, v in args.items() if k in scaling})
    return deployment(artifact, **kwargs)
