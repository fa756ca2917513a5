"""The files of a web bundle besides the library and the weights: the demo page, voxc.js (the
browser API), tvmjs.js, the tokenizer table, and the manifest fields voxc.js reads."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from targets.web_toolchain import build_tvmjs
from voxc.artifact import MANIFEST, WEB_TOKENIZER_TABLE, WEIGHT_INDEX, WeightShardWriter, state_section
from voxc.model.embedding import split_embedding_parts

WEB_DIR = Path(__file__).resolve().parent.parent / "web"  # voxc.js, the browser API, and the demo page
# The page and its helpers, copied from web/ next to voxc.js.
WEB_PAGE_FILES = ("index.html", "demo.js", "demo.css", "capture-worklet.js")


def copy_web_files(out: Path, *, tvmjs: str | Path | None = None, cache_dir=None, page: bool = True) -> None:
    shutil.copy2(tvmjs or build_tvmjs(cache_dir), out / "tvmjs.js")
    shutil.copy2(WEB_DIR / "voxc.js", out / "voxc.js")
    for name in WEB_PAGE_FILES if page else ():
        shutil.copy2(WEB_DIR / name, out / name)


def tokenizer_table(tokenizer, vocab_size: int | None = None) -> dict:
    """What voxc.js needs to turn token ids into text: each ordinary token's bytes (base64, index =
    id - num_special; special/control ids print nothing, as voxc.tokenizer's token_bytes).  A
    ``vocab_size`` above the tokenizer's (a benchmark model with a small vocabulary) is padded
    with one-byte pieces, so every id the model can emit decodes."""
    n_special = tokenizer.num_special_tokens
    pieces = [base64.b64encode(tokenizer.token_bytes(i)).decode("ascii")
              for i in range(n_special, tokenizer.vocab_size)]
    vocab = max(tokenizer.vocab_size, vocab_size or 0)
    pieces += [base64.b64encode(b"?").decode("ascii")] * (vocab - n_special - len(pieces))
    return {"format": 1, "vocab_size": vocab, "num_special": n_special,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "streaming_pad_id": tokenizer.streaming_pad_id, "streaming_word_id": tokenizer.streaming_word_id,
            "pieces": pieces}


def write_web_files(out: Path, *, target, executable, tokenizer_bytes: bytes, params, cfg, weights_written: bool,
                    tvmjs: str | Path | None = None, cache_dir=None) -> dict:
    """Write the page, voxc.js, tvmjs.js and ``tokenizer.json`` into ``out`` (which already holds the
    library and the weights) and return the web fields of the manifest.  ``params``: the graph's
    ``[(name, shape, dtype)]``."""
    from targets.webgpu import kernel_report
    from voxc.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:   # Tokenizer reads a file
        (Path(tmp) / "tekken.json").write_bytes(tokenizer_bytes)
        tokenizer = Tokenizer(Path(tmp) / "tekken.json")
    table = tokenizer_table(tokenizer, cfg.decoder.vocab_size)
    (out / WEB_TOKENIZER_TABLE).write_text(json.dumps(table, separators=(",", ":")))
    copy_web_files(out, tvmjs=tvmjs, cache_dir=cache_dir)
    report = kernel_report(executable)
    names = [name for name, _, _ in params]
    h = hashlib.sha256()
    for name in (target.library_name, WEIGHT_INDEX, WEB_TOKENIZER_TABLE):
        h.update(hashlib.sha256((out / name).read_bytes()).digest())
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in params]
    state = state_section(cfg, target.model_dtype, target.kv_int8)
    parts = split_embedding_parts(params)
    return {
        "kind": "voxtral-realtime",
        "id": h.hexdigest()[:16],          # the browser cache is keyed by it
        "wasm": target.library_name,
        "mel_dtype": target.mel_dtype,
        "param_names": names,
        "param_mode": "packed",
        "has_params": weights_written,
        "tokenizer_table": {"file": WEB_TOKENIZER_TABLE, **{k: v for k, v in table.items() if k != "pieces"}},
        "embedding": {"split": bool(parts), "parts": parts},
        "gpu": {**report, "largest_param_bytes": max(sizes, default=0), "total_param_bytes": sum(sizes),
                "largest_state_bytes_per_stream": max(s["tensor_bytes_per_stream"] for s in state.values()),
                "state_bytes_per_stream": sum(s["bytes_per_stream"] for s in state.values()),
                "footprint": gpu_footprint(params, state)},
        "largest_param_bytes": max(sizes, default=0),
        "required_features": report["required_features"],
        "max_workgroup_size": report["max_workgroup_size"],
    }


def gpu_footprint(params, state: dict, streams=(1, 2, 4)) -> dict:
    """The GPU memory a bundle allocates (voxc.js allocates exactly these buffers, the state with one
    slot per stream of ``Voxc.load``'s maxStreams; a key/value cache's pool starts with
    ``initial_pages_per_stream`` pages per stream and grows up to every stream's whole window): the
    weights, each state entry per stream at load (``initial_state_bytes_per_stream``) and at most
    (``state_bytes_per_stream``, all its layers' buffers), the largest buffer (a per-layer state's
    buffer is one layer's, at its largest), and the totals at load (``total_bytes``) and at most
    (``max_total_bytes``) for a few stream counts.  ``state``: the manifest's state section.  Scratch
    memory of the kernels (activations, attention partials) comes on top; it is small next to these
    for one stream."""
    sizes = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize for name, shape, dtype in params}
    weights = sum(sizes.values())
    state_bytes = {name: s["bytes_per_stream"] for name, s in state.items()}
    initial = {name: s["initial_pages_per_stream"] * s["bytes_per_page"] if s.get("axis") == "pages"
               else s["bytes_per_stream"] for name, s in state.items()}
    per_stream, initial_per_stream = sum(state_bytes.values()), sum(initial.values())
    buffers = [*sizes.items(), *((name, s["tensor_bytes_per_stream"]) for name, s in state.items())]
    largest = max(buffers, key=lambda kv: kv[1], default=("", 0))
    return {"weights_bytes": weights, "state_bytes_per_stream": state_bytes,
            "initial_state_bytes_per_stream": initial,
            "largest_buffer": {"name": largest[0], "bytes": int(largest[1]),
                               "per_stream": largest[0] in state},
            "total_bytes": {str(n): weights + n * initial_per_stream for n in streams},
            "max_total_bytes": {str(n): weights + n * per_stream for n in streams}}


def write_bundle(out_dir: str | Path, *, wasm: str | Path, executable=None, params=None,
                 param_names: list[str] | None = None, meta: dict | None = None,
                 tvmjs: str | Path | None = None, cache_dir: str | Path | None = None,
                 shard_mb: int = 32) -> Path:
    """A kernel bundle (not a model): ``voxc.js``, ``tvmjs.js``, ``model.wasm``, weights and a manifest
    voxc.js's generic loader reads (id, parameter order, GPU requirements).  The browser tests use
    it to run single compiled functions."""
    from targets.webgpu import shader_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wasm, out / "model.wasm")
    copy_web_files(out, tvmjs=tvmjs, cache_dir=cache_dir, page=False)
    names = list(param_names if param_names is not None else (params or {}).keys())
    writer = WeightShardWriter(out, shard_mb << 20)
    for name in names if params else ():
        writer.add(name, np.ascontiguousarray(params[name]))
    writer.finish()
    h = hashlib.sha256()
    for f in sorted([out / "model.wasm", *out.glob("params_shard_*.bin"), out / WEIGHT_INDEX]):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    manifest = {
        "kind": "kernels",
        "id": h.hexdigest()[:16],
        "wasm": "model.wasm",
        "weights": WEIGHT_INDEX,
        "param_names": names,
        "has_params": bool(params),
        "largest_param_bytes": int(writer.largest_bytes),
        **(shader_info(executable) if executable is not None else {}),
        "meta": meta or {},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out
