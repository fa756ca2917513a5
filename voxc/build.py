"""``voxc build``: checkpoint -> compiled artifact directory for one target.

An artifact is a directory any voxc runtime can load without the compiler:

* ``voxc-artifact.json``: format version, target, model config, the graph's parameter order,
  weight shards, tokenizer file, streaming defaults (left padding, delay);
* the compiled library (``model.so`` for llvm/cuda, ``model.wasm`` for webgpu);
* ``weights-NNNNN.safetensors``: parameters in the graph's layout and dtype, in shards;
* ``tekken.json``: the tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from voxc.errors import VoxcError

ARTIFACT_FORMAT = 1
MANIFEST = "voxc-artifact.json"
SHARD_BYTES = 512 * 1024 * 1024   # far below the browser's 2 GB ArrayBuffer limit
MEL_FILTERS = "mel_frontend.filters"


def export_graph(cfg, target):
    """The Relax module of the whole model for ``target`` and its ordered parameter list.

    Quantization comes from the surrounding :func:`voxc.model.layers.quantized` context.
    """
    from voxc.model.graph import VoxtralGraph

    graph = VoxtralGraph(cfg, dtype=target.model_dtype, mel_dtype=target.mel_dtype)
    return graph.export_tvm(spec=graph.export_spec())


class WeightSource:
    """Where the weights come from: a checkpoint directory (official or HF layout) or a GGUF file."""

    def __init__(self, path: str | Path, progress: bool, tokenizer: str | Path | None = None):
        path = Path(path)
        if not path.exists():
            raise VoxcError(f"{path} does not exist")
        self.path = path
        self.quantized: dict[str, object] = {}
        self.build_quantization: str | None = None   # what the graph is built with (set by build())
        if path.suffix == ".gguf":
            from voxc.quant.gguf_io import read_gguf

            self.config, tensors, meta = read_gguf(path)
            self.tensors = dict(tensors)      # GGUF data is memory-mapped: this holds views, not copies
            # Each layer keeps the type the file gives it where voxc has kernels for it; floats stay
            # dense; other quantized types (Q6_K, Q5_K ...) are re-quantized to the file's main type.
            self.overrides = {}
            for name, value in self.tensors.items():
                if getattr(value, "ndim", len(value.shape)) == 2 and name in meta["tensor_types"]:
                    if hasattr(value, "dequantize"):
                        self.overrides[name] = value.qtype
                    elif name not in meta["transcoded"] and meta["tensor_types"][name] in ("F32", "F16", "BF16"):
                        self.overrides[name] = None
            if tokenizer is not None:
                self.tokenizer_bytes = Path(tokenizer).read_bytes()
            elif meta.get("tokenizer_json"):
                self.tokenizer_bytes = meta["tokenizer_json"]
            else:
                raise VoxcError(f"{path.name} carries no tokenizer (the Rust port's files do not): pass the "
                                "model's tekken.json with --tokenizer")
            self.quantization = meta.get("qtype")
            self.left_pad_tokens = meta.get("left_pad_tokens")
        else:
            from voxc.loader.safetensors_loader import load_checkpoint

            ckpt = load_checkpoint(path, progress=progress, require_tokenizer=tokenizer is None)
            if ckpt.tokenizer_path is None and tokenizer is None:
                raise VoxcError(f"{path}: no tekken.json next to the weights; voxc needs the tokenizer")
            self.config = ckpt.config
            self.tensors = ckpt
            self.tokenizer_bytes = Path(tokenizer or ckpt.tokenizer_path).read_bytes()
            self.quantization = None
            self.left_pad_tokens = None
            self.overrides = {}

    def get(self, name: str):
        return self.tensors.get(name)

    def graph_param(self, name: str, shape: list[int]):
        """The value of graph parameter ``name``: a checkpoint tensor, or packed from one."""
        from voxc.quant.linear import pack_linear_weight

        prefix, _, field = name.rpartition(".")
        if field not in ("qweight", "scales"):
            value = self.get(name)
            return value.dequantize() if hasattr(value, "dequantize") else value
        if prefix not in self.quantized:
            source = self.get(prefix + ".weight")
            self.quantized.clear()   # the two fields of one layer are consecutive: keep one layer packed
            self.quantized[prefix] = pack_linear_weight(source, self.storage_of(prefix, source))
        return self.quantized[prefix][field]

    def storage_of(self, prefix: str, source):
        from voxc.quant import linear_storage

        name = prefix + ".weight"
        if name in self.overrides and self.build_quantization == self.quantization:
            return self.overrides[name]
        return linear_storage(int(source.shape[1]), self.build_quantization)


def build(checkpoint: str | Path, target_name: str, out_dir: str | Path, *, progress: bool = True,
          left_pad_tokens: int | None = None, quantization: str | None = None, dtype: str | None = None,
          tokenizer: str | Path | None = None, cpu: str | None = None) -> Path:
    """Compile ``checkpoint`` for ``target_name`` into the artifact directory ``out_dir``.

    ``quantization``: q4_0, q4_k or q8_0 to quantize the projections and the embedding table;
    a GGUF input keeps its own type unless this says otherwise.  ``dtype``: the activation, cache
    and float-weight dtype (float32 or float16; default: the target's).  ``cpu`` (llvm only): the
    CPU to generate code for, ``native`` (default), ``generic`` or an LLVM CPU name.
    """
    from targets import get_target
    from voxc.model import mel
    from voxc.model.layers import quantized
    from voxc.quant import QType
    from voxc.quant.gguf_io import LEFT_PAD_DEFAULT, LEFT_PAD_Q4_0
    from voxc.quant.linear import kernel_target

    out_dir = Path(out_dir)
    target = get_target(target_name)
    if dtype is not None:
        if dtype not in ("float32", "float16"):
            raise VoxcError(f"--dtype must be float32 or float16, not {dtype}")
        target = dataclasses.replace(target, model_dtype=dtype)
    if cpu is not None:
        if not hasattr(target, "mcpu"):
            raise VoxcError(f"--cpu applies to the llvm (CPU) target, not {target.name}")
        target = dataclasses.replace(target, mcpu=cpu)
    log = _Log(progress)
    source = WeightSource(checkpoint, progress, tokenizer)
    quant = QType.parse(quantization).value if quantization else source.quantization
    source.build_quantization = quant
    if left_pad_tokens is None:
        left_pad_tokens = source.left_pad_tokens
    if left_pad_tokens is None and quant:
        left_pad_tokens = LEFT_PAD_Q4_0 if quant == "q4_0" else LEFT_PAD_DEFAULT
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise VoxcError(f"{out_dir} exists and is not a voxc artifact; refusing to overwrite it")
    log.step(f"exporting the graph for {target.name}" + (f", weights {quant}" if quant else ""))
    # a GGUF keeps its per-layer types unless the user asked for another quantization
    overrides = source.overrides if quant == source.quantization else None
    with quantized(quant, overrides), kernel_target(target.name):
        mod, params = target.export_graph(source.config)
    log.step(f"compiling {len(mod.functions)} functions for {target.name} (this takes a while)")
    executable = target.compile(mod)
    package = getattr(target, "package", None)
    if package is not None:   # a target with its own output layout (webgpu: a static web folder)
        return package(out_dir, executable=executable, params=params, source=source, left_pad_tokens=left_pad_tokens,
                       quantization=quant, progress=progress, log=log.step)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = target.export(executable, out_dir)
    log.step("writing weights")
    param_specs = [(name, [int(s) for s in p.shape], str(p.dtype)) for name, p in params]
    computed = {MEL_FILTERS: mel.mel_filter_bank(source.config.audio, source.config.encoder.num_mel_bins)}
    shards = _write_weights(source, param_specs, computed, out_dir, progress)
    (out_dir / "tekken.json").write_bytes(source.tokenizer_bytes)
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
        "config": source.config.to_dict(),
        "params": [{"name": n, "shape": s, "dtype": d} for n, s, d in param_specs],
        "weights": shards,
        "tokenizer": "tekken.json",
        "left_pad_tokens": left_pad_tokens if left_pad_tokens is not None else tokenizer.n_left_pad_tokens,
        "default_delay_ms": int(tokenizer.transcription_delay_ms or 480),
        "quantization": quant,
        **(target.manifest_extras() if hasattr(target, "manifest_extras") else {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.step(f"artifact written to {out_dir}")
    return out_dir


def _write_weights(source, param_specs, computed, out_dir: Path, progress: bool) -> list[str]:
    """Stream tensors from the source into shards, converting to the graph's layout and dtype."""
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
        array = computed[name] if name in computed else source.graph_param(name, shape)
        if list(array.shape) != shape:
            raise VoxcError(f"tensor {name}: checkpoint shape {list(array.shape)} but the graph expects {shape}")
        array = np.ascontiguousarray(np.asarray(array).astype(_numpy_dtype(dtype), copy=False))
        if current_bytes + array.nbytes > SHARD_BYTES:
            flush()
        current[name] = array
        current_bytes += array.nbytes
    flush()
    return shards


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
