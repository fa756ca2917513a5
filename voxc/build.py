"""``voxc build``: checkpoint -> compiled artifact directory for one target (voxc.artifact says what
an artifact holds).

The build validates every input before it compiles, writes the artifact into a temporary
directory beside the output and renames it into place only when it is complete: a failed or
interrupted build leaves no debris and an earlier artifact at the same path untouched.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from voxc import artifact
from voxc.errors import VoxcError
from voxc.quant import StorageChoice

DTYPES = ("float32", "float16")


def build(checkpoint: str | Path, target, out_dir: str | Path, *, progress: bool = True,
          left_pad_tokens: int | None = None, quantization: str | None = None, dtype: str | None = None,
          tokenizer: str | Path | None = None, cpu: str | None = None, weights: bool = True, force: bool = False,
          strict_quantization: bool = False, int8_activations: bool = False, kv_int8=None, report=None) -> Path:
    """Compile ``checkpoint`` for ``target`` into the artifact directory ``out_dir``.

    ``target``: a target name (llvm, cuda, webgpu) or a targets.base.TargetSpec.
    ``quantization``: q4_0, q4_k or q8_0 to quantize the projections and the embedding table;
    a GGUF input keeps its own type unless this says otherwise.  ``strict_quantization``: a weight
    whose rows do not fit the requested type's blocks is an error instead of stored in another type.
    ``dtype``: the activation, cache and float-weight dtype (float32 or float16; default: the
    target's, float16 for a quantized GPU build).  ``cpu`` (llvm only): the CPU to generate code for,
    ``native`` (default), ``generic`` or an LLVM CPU name.  ``int8_activations`` (llvm only): quantized
    GEMVs round activations to int8 and use the CPU's integer dot products (faster, less exact).
    ``kv_int8``: towers (encoder, decoder, "all") whose KV caches store 8-bit values with a float32
    scale per row and head (CUDA; llvm through reference kernels): half of float16's memory and reads.  ``weights=False`` writes no weights (a
    benchmark artifact: the checkpoint needs only its config and tokenizer; runtimes fill random
    weights).  ``force``: replace an existing ``out_dir``.  ``report``: a targets.base.CompileReport
    the compile fills in.
    """
    from targets import get_target
    from targets.base import TargetSpec
    from voxc.loader.source import WeightSource
    from voxc.model.export import export_graph
    from voxc.model.quantization import QuantPlan
    from voxc.quant import QType, print_storage_table
    from voxc.tokenizer import Tokenizer

    log = _Log(progress)
    out_dir = Path(out_dir)
    _check_output(out_dir, force)
    target = target if isinstance(target, TargetSpec) else get_target(target)
    if dtype is not None and dtype not in DTYPES:
        raise VoxcError(f"--dtype must be float32 or float16, not {dtype}")
    if cpu is not None:
        if not hasattr(target, "mcpu"):
            raise VoxcError(f"--cpu applies to the llvm (CPU) target, not {target.name}")
        target = dataclasses.replace(target, mcpu=cpu)
        target.tvm_target()   # an unknown CPU name fails here, before the compile
    if int8_activations:
        if not hasattr(target, "int8_activations"):
            raise VoxcError(f"--int8-activations applies to the llvm (CPU) target, not {target.name}")
        target = dataclasses.replace(target, int8_activations=True)
    towers = artifact.kv_int8_towers(kv_int8)
    if towers:
        if not target.supports_kv_int8:
            raise VoxcError(f"--kv-int8 needs the cuda target (or llvm); {target.name} has no 8-bit KV-cache kernels")
        target = dataclasses.replace(target, kv_int8=towers)
    if left_pad_tokens is not None:
        artifact.check_left_pad_tokens(left_pad_tokens)
    quant_request = QType.parse(quantization).value if quantization else None

    source = WeightSource(checkpoint, progress, tokenizer, read_weights=weights)
    tok = Tokenizer.from_bytes(source.tokenizer_bytes, name=str(tokenizer or checkpoint))
    if tok.vocab_size > source.config.decoder.vocab_size:
        raise VoxcError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {source.config.decoder.vocab_size}")
    quant = quant_request or source.quantization
    # a GGUF keeps its per-layer types unless the user asked for another quantization
    overrides = source.overrides if quant == source.quantization else {}
    if dtype is None and quant and getattr(target, "quantized_dtype", None):
        dtype = target.quantized_dtype
    if dtype is not None:
        target = dataclasses.replace(target, model_dtype=dtype)
    if left_pad_tokens is None:
        left_pad_tokens = source.left_pad_tokens
    if left_pad_tokens is None:
        left_pad_tokens = artifact.default_left_pad_tokens(quant) if quant else tok.n_left_pad_tokens
    left_pad_tokens = artifact.check_left_pad_tokens(left_pad_tokens)
    default_delay_ms = int(tok.transcription_delay_ms or artifact.DEFAULT_DELAY_MS)
    artifact.delay_tokens(default_delay_ms, source.config.audio)   # a tokenizer with an untrained delay fails here
    # weights with the delay folded in (an ONNX export) make an artifact for that delay only
    fixed_delay = {artifact.FIXED_DELAY_FIELD: source.fixed_delay_ms} if source.fixed_delay_ms is not None else {}
    if fixed_delay:
        default_delay_ms = source.fixed_delay_ms
    choices = storage_choices(source, quant, overrides)
    odd = [c for c in choices if c.reason]
    if strict_quantization and odd:
        raise VoxcError(f"{odd[0].name} cannot be stored as {odd[0].requested}: {odd[0].reason} ({len(odd)} such "
                        f"weights; without --strict-quantization they are stored as the build's table shows)")
    if progress:
        print_storage_table(choices, quant)

    log.step(f"exporting the graph for {target.name}" + (f", weights {quant}" if quant else "")
             + f", {target.model_dtype}")
    mod, params = export_graph(source.config, target.graph_options(QuantPlan(quant, overrides)))
    log.step(f"compiling {len(mod.functions)} functions for {target.name} (this takes a while)")
    executable = target.compile(mod, report)
    specs = [(name, [int(s) for s in p.shape], str(p.dtype)) for name, p in params]

    staging = out_dir.with_name(f".{out_dir.name}.voxc-build-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        library = target.export(executable, staging)
        if weights:
            log.step("writing weights")
            _write_weights(source, specs, quant, overrides, staging, target.shard_bytes, progress)
        else:
            artifact.WeightShardWriter(staging, target.shard_bytes).finish()
        extras = target.package(staging, executable=executable, tokenizer_bytes=source.tokenizer_bytes,
                                params=specs, cfg=source.config, weights_written=weights)
        manifest = artifact.new_manifest(
            target=target.name, device_kind=target.device_kind, library=library.name, model_dtype=target.model_dtype,
            cfg=source.config, params=specs, quantization=quant, left_pad_tokens=left_pad_tokens,
            default_delay_ms=default_delay_ms, tokenizer=artifact.TOKENIZER_FILE, voxc_version=_voxc_version(),
            tvm_version=_tvm_version(),
            entries=[*artifact.ENTRY_POINTS, *(e.name for e in getattr(target, "static_entries", ()))],
            weights_included=weights, kv_int8=target.kv_int8, **fixed_delay, **target.manifest_extras(), **extras)
        footprint = extras.get("gpu", {}).get("footprint")
        if footprint:   # a web bundle: what the browser must hold on its GPU
            state = sum(footprint["state_bytes_per_stream"].values())
            initial = sum(footprint["initial_state_bytes_per_stream"].values())
            log.step(f"GPU memory: {footprint['weights_bytes'] / 2**30:.2f} GiB of weights + {initial / 2**30:.2f} GiB "
                     f"of state per stream at load, up to {state / 2**30:.2f} GiB as its key/value caches fill "
                     f"(largest buffer: {footprint['largest_buffer']['name']}, "
                     f"{footprint['largest_buffer']['bytes'] / 2**30:.2f} GiB)")
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        artifact.write_manifest(staging, manifest)
        _replace(staging, out_dir)
        # the build just hashed these files: its own artifact's first load need not hash them again
        artifact.record_verified(out_dir, artifact.read_manifest(out_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.step(f"artifact written to {out_dir}")
    return out_dir


def _check_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise VoxcError(f"{out_dir} is a file; give a directory for the artifact")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        what = "an artifact" if (out_dir / artifact.MANIFEST).exists() else "not empty"
        raise VoxcError(f"{out_dir} exists and is {what}; pass --force to replace it (the old contents stay until "
                        f"the new artifact is complete)")
    if not out_dir.parent.exists():
        raise VoxcError(f"{out_dir.parent} does not exist")


def _replace(staging: Path, out_dir: Path) -> None:
    """Move the finished artifact into place; an old one is removed only after the new one is there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.voxc-old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_weights(source, specs, quant, overrides, out_dir: Path, shard_bytes: int, progress: bool) -> None:
    """Stream tensors from the source into shards, converting to the graph's layout and dtype.  The
    blocks of a split token table (voxc.model.embedding) are row ranges of the whole table."""
    from tqdm import tqdm

    from voxc.model import mel
    from voxc.model.embedding import split_param_sources

    cfg = source.config
    computed = {artifact.MEL_FILTERS: mel.mel_filter_bank(cfg.audio, cfg.encoder.num_mel_bins)}
    split = split_param_sources(specs)
    table = {}   # the whole token table field while its blocks are written
    writer = artifact.WeightShardWriter(out_dir, shard_bytes)
    for name, shape, dtype in tqdm(specs, desc="weights", unit="tensor", disable=not progress):
        if name in computed:
            array = computed[name]
        elif name in split:
            whole, rows = split[name]
            if whole not in table:
                table.clear()
                table[whole] = source.graph_param(whole, quant, overrides)
            array = table[whole][rows]
        else:
            array = source.graph_param(name, quant, overrides)
        if list(array.shape) != shape:
            raise VoxcError(f"tensor {name}: checkpoint shape {list(array.shape)} but the graph expects {shape}")
        writer.add(name, np.asarray(array).astype(artifact.numpy_dtype(dtype), copy=False))
    writer.finish()


def storage_choices(source, quant: str | None, overrides: dict) -> list[StorageChoice]:
    """The storage of every projection weight for a build quantized to ``quant`` (empty when dense)."""
    from voxc.loader.names import QUANTIZED_WEIGHT, expected_shapes, graph_weight_storage, stacked_into
    from voxc.quant import QType, weight_storage

    if not quant:
        return []
    requested = QType.parse(quant)
    choices = []
    for name, shape in expected_shapes(source.config).items():
        if not QUANTIZED_WEIGHT.match(name) or len(shape) != 2:
            continue
        stored = graph_weight_storage(stacked_into(name) or name, int(shape[1]), quant, overrides)
        label = stored.name if stored is not None else "float"
        reason = ""
        if stored is not weight_storage(name, int(shape[1]), quant, overrides):
            reason = "stacked into one matmul with projections the file stores in another type"
        elif name in overrides:
            file_type = getattr(source, "tensor_types", {}).get(name, label)
            reason = "" if stored is requested else f"the file stores it as {file_type}"
        elif name in getattr(source, "transcoded", {}):
            reason = f"re-quantized from the file's {source.tensor_types.get(name)}"
        elif stored is not requested:
            reason = (f"its rows of {shape[1]} are not a multiple of {requested.name}'s {requested.block_size}-value "
                      f"blocks")
        choices.append(StorageChoice(name, requested.name, label, reason))
    return choices



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
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)
