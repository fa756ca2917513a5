"""``voxc build``: checkpoint -> compiled artifact directory for one target.

An artifact is a directory any voxc runtime can load without the compiler:

* ``voxc-artifact.json``: format version, target, model config, the graph's parameter order,
  weight shards, tokenizer file, streaming defaults (left padding, delay);
* the compiled library (``model.so`` for llvm/cuda, ``model.wasm`` for webgpu);
* ``weights-NNNNN.safetensors``: parameters in the graph's layout and dtype, in shards;
* ``tekken.json``: the tokenizer.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from voxc.errors import VoxcError

ARTIFACT_FORMAT = 1
MANIFEST = "voxc-artifact.json"
SHARD_BYTES = 512 * 1024 * 1024   # far below the browser's 2 GB ArrayBuffer limit
MEL_FILTERS = "mel_frontend.filters"


def export_graph(cfg, target):
    """The Relax module of the whole model for ``target`` and its ordered parameter list."""
    from voxc.model.graph import VoxtralGraph

    graph = VoxtralGraph(cfg, dtype=target.model_dtype, mel_dtype=target.mel_dtype)
    return graph.export_tvm(spec=graph.export_spec())


def build(checkpoint: str | Path, target_name: str, out_dir: str | Path, *, progress: bool = True,
          left_pad_tokens: int | None = None) -> Path:
    from targets import get_target
    from voxc.loader.safetensors_loader import load_checkpoint
    from voxc.model import mel

    out_dir = Path(out_dir)
    target = get_target(target_name)
    log = _Log(progress)
    ckpt = load_checkpoint(checkpoint, progress=progress)
    if ckpt.tokenizer_path is None:
        raise VoxcError(f"{checkpoint}: no tekken.json next to the weights; voxc needs the tokenizer")
    log.step(f"exporting the graph for {target.name}")
    mod, params = export_graph(ckpt.config, target)
    log.step(f"compiling {len(mod.functions)} functions for {target.name} (this takes a while)")
    executable = target.compile(mod)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise VoxcError(f"{out_dir} exists and is not a voxc artifact; refusing to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    library = target.export(executable, out_dir)
    log.step("writing weights")
    param_specs = [(name, [int(s) for s in p.shape], str(p.dtype)) for name, p in params]
    computed = {MEL_FILTERS: mel.mel_filter_bank(ckpt.config.audio, ckpt.config.encoder.num_mel_bins)}
    shards = _write_weights(ckpt, param_specs, computed, out_dir, progress)
    shutil.copyfile(ckpt.tokenizer_path, out_dir / "tekken.json")
    from voxc.tokenizer import Tokenizer

    tokenizer = Tokenizer(out_dir / "tekken.json")
    manifest = {
        "format": ARTIFACT_FORMAT,
        "voxc_version": _voxc_version(),
        "tvm_version": _tvm_version(),
        "target": target.name,
        "device_kind": target.device_kind,
        "library": library.name,
        "model_dtype": target.model_dtype,
        "config": ckpt.config.to_dict(),
        "params": [{"name": n, "shape": s, "dtype": d} for n, s, d in param_specs],
        "weights": shards,
        "tokenizer": "tekken.json",
        "left_pad_tokens": left_pad_tokens if left_pad_tokens is not None else tokenizer.n_left_pad_tokens,
        "default_delay_ms": int(tokenizer.transcription_delay_ms or 480),
        "quantization": None,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.step(f"artifact written to {out_dir}")
    return out_dir


def _write_weights(ckpt, param_specs, computed, out_dir: Path, progress: bool) -> list[str]:
    """Stream tensors from the checkpoint into shards, converting to the graph's dtype on the way."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    for old in out_dir.glob("weights-*.safetensors"):
        old.unlink()
    shards, current, current_bytes = [], {}, 0

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"weights-{len(shards):05d}.safetensors"
            save_file(current, str(out_dir / name))
            shards.append(name)
            current, current_bytes = {}, 0

    for name, shape, dtype in tqdm(param_specs, desc="weights", unit="tensor", disable=not progress):
        array = computed[name] if name in computed else ckpt.get(_checkpoint_name(name))
        if list(array.shape) != shape:
            raise VoxcError(f"tensor {name}: checkpoint shape {list(array.shape)} but the graph expects {shape}")
        array = np.ascontiguousarray(array.astype(_numpy_dtype(dtype), copy=False))
        if current_bytes + array.nbytes > SHARD_BYTES:
            flush()
        current[name] = array
        current_bytes += array.nbytes
    flush()
    return shards


def _checkpoint_name(graph_name: str) -> str:
    """The graph's parameter names are voxc names, except for nn.Conv1D/nn.Linear defaults that agree."""
    return graph_name


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _voxc_version() -> str:
    from voxc import __version__
    return __version__


def _tvm_version() -> str:
    from importlib.metadata import version
    return version("apache-tvm")


class _Log:
    """Stage lines with elapsed time on stderr, so long builds show they are alive."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def step(self, message: str):
        if self.enabled:
            import sys
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)
