"""The artifact contract: what ``voxc build`` writes and every runtime reads (numpy and stdlib only).

An artifact is a directory:

* ``voxc-artifact.json`` (:data:`MANIFEST`): format version, target, model config, the entry
  points, parameter order, state shapes, streaming constants and defaults, and the size and
  SHA-256 of every other file.  The browser runtime (web/voxc.js) reads the same file and takes
  every number it needs from it;
* the compiled library (``model.so`` for llvm/cuda, ``model.wasm`` for webgpu);
* the weights in the graph's layout and dtype: ``tensor-cache.json`` (:data:`WEIGHT_INDEX`) and
  ``params_shard_<i>.bin``, raw little-endian records at 4-byte-aligned offsets (tvmjs's tensor
  cache format, so the browser streams the same files the native runtime memory-maps);
* the tokenizer: ``tekken.json`` (native), ``tokenizer.json`` (web: token bytes per id).

This module is the one source of those names and numbers, of the per-stream device state, of the
streaming constants and of the delay rule; build, targets, the runtime and voxc.js all use it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from voxc.config import AudioConfig, ModelConfig
from voxc.errors import VoxcError

# 2: tensor-cache weights, file checksums, entry/state/streaming sections;
# 3: stacked q/k/v and w1/w3 weights (attention.wqkv, feed_forward.w13); the set_delay entry and the
#    delay_scales state, which decode reads instead of delay_tokens;
# 4: per-layer KV caches: enc_cache and dec_cache are tuples of one tensor per layer (state "layers")
# 5: paged KV caches: each layer's cache is a pool of pages [n_pages, 2, page_rows, heads, head_dim]
#    (state "axis": "pages"), one page table per tower (enc_pages, dec_pages [slots, pages_per_stream]
#    int32) that encode and decode take; state entries carry their dtype
FORMAT_VERSION = 5
MANIFEST = "voxc-artifact.json"
WEIGHT_INDEX = "tensor-cache.json"
SHARD_NAME = "params_shard_{}.bin"
TOKENIZER_FILE = "tekken.json"
WEB_TOKENIZER_TABLE = "tokenizer.json"
# vulkan/metal: voxc's WebGPU device for TVM's runtime, native code loaded before the model library
WGPU_PLUGIN_FILE = "voxc_wgpu_device.so"
MEL_FILTERS = "mel_frontend.filters"   # a graph parameter computed at build time, not read from a checkpoint
NATIVE_SHARD_BYTES = 512 << 20
WEB_SHARD_BYTES = 32 << 20             # each shard is fetched and cached by the browser on its own

# ---- entry points ----------------------------------------------------------------------------------
ENTRY_POINTS = ("mel", "encode", "encode_stages", "set_delay", "decode")


@dataclasses.dataclass(frozen=True)
class StaticEntry:
    """A static-shape copy of an entry point: fixed symbolic dims get GEMV kernels and no shape
    arithmetic.  ``dims`` maps the entry's symbolic dims to their values."""
    name: str
    entry: str
    dims: tuple[tuple[str, int], ...]

    def dim(self, name: str) -> int:
        return dict(self.dims)[name]


# One stream, one token: every single-token decode step.
DECODE_B1N1 = StaticEntry("decode_b1n1", "decode", (("b", 1), ("n", 1)))
# One stream's 80 ms streaming step (8 mel frames -> 4 encoder rows -> 1 audio embedding).
ENCODE_B1T8 = StaticEntry("encode_b1t8", "encode", (("b", 1), ("t", 8)))
STATIC_ENTRIES = {e.name: e for e in (DECODE_B1N1, ENCODE_B1T8)}

# ---- device state per stream ----------------------------------------------------------------------
# Left context the causal convs of the stem carry between calls (mel frames, conv0 frames).
CONV0_CONTEXT = 2
CONV1_CONTEXT = 1
# Audio embeddings buffered per stream between encoder and decoder (rows of the device audio ring).
# The session never lets the encoder run further ahead of the decoder than this.
AUDIO_RING_ROWS = 256


# Rows of one KV-cache page (schedules/ring_attention.py): a tower's page holds min(KV_PAGE_ROWS, window)
# consecutive ring rows.  64 rows: a 60 s stream's ~800 decoder positions take 13 pages (832 rows, 4 %
# unused) where 128-row pages would take 7 (896 rows); a multiple of the CUDA kernel's key tile (16 rows
# per block and step at full size) and of the CPU kernel's 16-key blocks, and 768 encoder rows for its
# 750-row window either way.  The float16 decoder page is 256 KiB per layer, the encoder's 512 KiB.
KV_PAGE_ROWS = 64
# A new model's page pools hold this much audio per stream (max_streams of them), and grow as streams
# need up to every stream's whole window: 4 s is the 39-token prompt plus 0.9 s of speech in the
# decoder, 200 encoder frames.
KV_INITIAL_SECONDS = 4.0
# A growth adds the pages missing plus 1/KV_GROWTH_HEADROOM of the pool (not a doubling: at tens of GB
# that overshoots by as much; a 256-stream decoder pool on an H100 doubled from the 28 GB its streams
# held to 56 GB and left the encoder's no room).  In the manifest (``growth_headroom``) for voxc.js.
KV_GROWTH_HEADROOM = 4


# 8-bit KV caches (``voxc build --kv-int8``): a tower's pool holds int8 values with one float32 scale
# per (k or v, ring row, kv head) -- max |x| / 127 over the head's values, so every row keeps its own
# range.  A page of such a pool is plain bytes, ``[n_pages, page_bytes] int8``: first the page's
# ``2 x page_rows x heads x head_dim`` values in the float layout's order (k/v, row, head, element),
# padded to INT8_KV_ALIGN bytes, then the ``2 x page_rows x heads`` scales in the same order, as
# little-endian float32.  One tensor per layer keeps one page table and one binding per kernel; the
# alignment lets the CUDA kernels read 16-byte vectors of values and 4-byte scales.  It halves the
# encoder's cache (and the bytes its attention reads a step) against float16.
KV_TOWERS = {"encoder": "enc_cache", "decoder": "dec_cache"}   # --kv-int8 names -> state entries
INT8_KV_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class Int8KvPage:
    """Byte layout of one page of an 8-bit KV pool (see INT8_KV_ALIGN)."""
    page_rows: int
    heads: int
    head_dim: int

    @property
    def values_bytes(self) -> int:
        return -(-2 * self.page_rows * self.heads * self.head_dim // INT8_KV_ALIGN) * INT8_KV_ALIGN

    @property
    def page_bytes(self) -> int:
        scales = 2 * self.page_rows * self.heads * 4
        return -(-(self.values_bytes + scales) // INT8_KV_ALIGN) * INT8_KV_ALIGN

    def value_offset(self, kv, row, head, element):
        """Byte of value ``element`` of (k or v, row, head) within its page (ints or TIR expressions)."""
        return ((kv * self.page_rows + row) * self.heads + head) * self.head_dim + element

    def scale_index(self, kv, row, head):
        """Index of (k or v, row, head)'s scale among the page's float32 words."""
        return self.values_bytes // 4 + (kv * self.page_rows + row) * self.heads + head


def kv_int8_towers(towers) -> tuple[str, ...]:
    """``--kv-int8``'s towers, checked and in a fixed order: a comma list of encoder/decoder, or all/none."""

    if towers is None:
        return ()
    names = [t.strip() for t in (towers.split(",") if isinstance(towers, str) else towers) if t.strip()]
    if names in (["all"], ["both"]):
        names = list(KV_TOWERS)
    if names == ["none"]:
        names = []
    unknown = [t for t in names if t not in KV_TOWERS]
    if unknown:
        raise VoxcError(f"--kv-int8 {','.join(unknown)}: the towers are {', '.join(KV_TOWERS)} (or all, none)")
    return tuple(t for t in KV_TOWERS if t in names)


def manifest_kv_int8(manifest: dict) -> tuple[str, ...]:
    """The towers a (checked) manifest says have 8-bit KV caches (none in one built before them)."""
    return tuple(manifest.get("kv_int8", ()))


def kv_page_rows(window: int) -> int:
    """Rows of one page of a ring of ``window`` rows."""
    return min(KV_PAGE_ROWS, int(window))


def kv_pages_per_stream(window: int) -> int:
    """Pages of one stream's whole ring (the last one partly used when page_rows does not divide the window)."""
    return -(-int(window) // kv_page_rows(window))


@dataclasses.dataclass(frozen=True)
class StateEntry:
    """One entry of the per-stream device state: a tensor of ``shape`` (``None`` at the variable axis),
    or, with ``layers``, a tuple of ``layers`` such tensors, one per layer.  ``dtype`` None: the model's.

    ``axis`` says what the variable axis counts: ``"slots"``, one row per stream; ``"pages"`` (the KV
    caches), pages of ``page_rows`` ring rows of a pool that all streams share through the page table
    ``page_table`` (another entry, ``[slots, pages_per_stream]`` int32): ring row ``r`` of a stream is
    row ``r % page_rows`` of page ``table[slot, r // page_rows]``.  A pool starts small and grows (the
    runtime's kv_pages), so a stream's memory follows the positions it has reached; the most it holds
    is ``pages_per_stream`` pages (its whole window).

    The KV caches are per layer because WebGPU and Vulkan bind a whole buffer per kernel argument and
    limit one binding (NVIDIA's Vulkan driver: 2 GiB; many browsers: 128 MiB to 1 GiB): each attention
    kernel binds only its own layer's pool, at most 32 MiB a stream for the decoder in float16."""
    shape: tuple[int | None, ...]
    layers: int | None = None
    dtype: str | None = None
    axis: str = "slots"
    page_rows: int | None = None
    pages_per_stream: int | None = None
    window: int | None = None
    page_table: str | None = None
    initial_pages_per_stream: int | None = None
    positions_per_second: float | None = None   # a paged entry: ring rows a stream fills per second of audio

    @property
    def tensors(self) -> int:
        return 1 if self.layers is None else self.layers

    @property
    def paged(self) -> bool:
        return self.axis == "pages"

    def dtype_for(self, model_dtype: str) -> str:
        return self.dtype or model_dtype

    def tensor_bytes(self, dtype: str, streams: int = 1) -> int:
        """Bytes of one of its tensors (one layer's) holding ``streams`` streams (a paged entry: their
        whole windows, the most its pool grows to)."""
        return math.prod(self.concrete_shape(self.rows_for(streams))) * numpy_dtype(self.dtype_for(dtype)).itemsize

    def page_bytes(self, dtype: str) -> int:
        """Bytes of one page of one layer's pool (a paged entry)."""
        return math.prod(self.concrete_shape(1)) * numpy_dtype(self.dtype_for(dtype)).itemsize

    def pages_for_seconds(self, seconds: float) -> int:
        """Pages one stream holds after ``seconds`` of audio (a paged entry; at most its whole window)."""
        rows = min(int(self.window), math.ceil(seconds * self.positions_per_second))
        return -(-rows // self.page_rows)

    def rows_for(self, streams: int) -> int:
        """Length of the variable axis for ``streams`` streams at most."""
        return streams * self.pages_per_stream if self.paged else streams

    def concrete_shape(self, rows: int) -> tuple[int, ...]:
        """The shape with ``rows`` at the variable axis (slots, or pages of a paged entry)."""
        return tuple(rows if s is None else s for s in self.shape)


def state_layout(cfg: ModelConfig, kv_int8: tuple[str, ...] = ()) -> dict[str, StateEntry]:
    """Device state, name -> entry.  Every entry point takes and returns the entries it uses, updated
    in place (a per-layer entry as a tuple; the page tables are only read); the order is the runtime's.
    ``kv_int8``: the towers whose KV caches are 8-bit (:class:`Int8KvPage`)."""
    e, d, a = cfg.encoder, cfg.decoder, cfg.audio
    int8_entries = {KV_TOWERS[t] for t in kv_int8_towers(kv_int8)}

    def cache(window, heads, head_dim, layers, table, positions_per_second, name):
        # paged ring KV caches (schedules/ring_attention.py): per layer [pages, 2 (k, v), page_rows, heads,
        # head_dim], or an 8-bit pool's [pages, page bytes] int8
        rows = kv_page_rows(window)
        shape, dtype = (None, 2, rows, heads, head_dim), None
        if name in int8_entries:
            shape, dtype = (None, Int8KvPage(rows, heads, head_dim).page_bytes), "int8"
        entry = StateEntry(shape, layers=layers, dtype=dtype, axis="pages", page_rows=rows,
                           pages_per_stream=kv_pages_per_stream(window), window=window, page_table=table,
                           positions_per_second=positions_per_second)
        return dataclasses.replace(entry, initial_pages_per_stream=entry.pages_for_seconds(KV_INITIAL_SECONDS))

    return {
        "conv0_state": StateEntry((None, CONV0_CONTEXT, e.num_mel_bins)),
        "conv1_state": StateEntry((None, CONV1_CONTEXT, e.dim)),
        "enc_cache": cache(e.sliding_window, e.n_heads, e.head_dim, e.n_layers, "enc_pages",
                           a.frame_rate * a.downsample_factor, "enc_cache"),
        "enc_pages": StateEntry((None, kv_pages_per_stream(e.sliding_window)), dtype="int32"),
        "audio_ring": StateEntry((None, AUDIO_RING_ROWS, d.dim)),
        "dec_cache": cache(d.sliding_window, d.n_kv_heads, d.head_dim, d.n_layers, "dec_pages", a.frame_rate, "dec_cache"),
        "dec_pages": StateEntry((None, kv_pages_per_stream(d.sliding_window)), dtype="int32"),
        # each stream's ada-norm scale per decoder layer: set once per stream, for its delay (set_delay)
        "delay_scales": StateEntry((None, d.n_layers, d.dim)),
    }


def paged_entries(layout: dict[str, StateEntry]) -> dict[str, StateEntry]:
    """The paged entries (the KV caches) of a state layout."""
    return {name: entry for name, entry in layout.items() if entry.paged}


def state_section(cfg: ModelConfig, dtype: str, kv_int8: tuple[str, ...] = ()) -> dict:
    """The manifest's ``state`` section: per entry the shape of one tensor (null at the variable axis),
    ``layers`` (a per-layer tuple) or null, its dtype, ``axis`` (what the null axis counts: slots, or
    pages), and the bytes per stream of one tensor and of the entry (a paged entry: a whole window's
    pages, the most one stream holds).  A paged entry also gives its page layout: ``page_rows``,
    ``pages_per_stream``, ``window``, ``page_table`` (the entry holding the page table),
    ``initial_pages_per_stream`` (a new pool's pages per stream), ``growth_headroom`` (a growth adds the
    pages missing plus the pool's size over this), and the bytes of one page in one layer's tensor and
    in all layers."""
    out = {}
    for name, v in state_layout(cfg, kv_int8).items():
        one = v.tensor_bytes(dtype)
        spec = {"shape": list(v.shape), "layers": v.layers, "dtype": v.dtype_for(dtype), "axis": v.axis,
                "tensor_bytes_per_stream": one, "bytes_per_stream": v.tensors * one}
        if v.paged:
            page = v.page_bytes(dtype)
            spec.update({"page_rows": v.page_rows, "pages_per_stream": v.pages_per_stream, "window": v.window,
                         "page_table": v.page_table, "initial_pages_per_stream": v.initial_pages_per_stream,
                         "growth_headroom": KV_GROWTH_HEADROOM,
                         "tensor_bytes_per_page": page, "bytes_per_page": v.tensors * page})
        out[name] = spec
    return out


def state_bytes_per_stream(cfg: ModelConfig, dtype: str, kv_int8: tuple[str, ...] = ()) -> dict[str, int]:
    """Bytes of each state entry (all its tensors) per stream (the KV caches: a whole window's pages)."""
    return {k: s["bytes_per_stream"] for k, s in state_section(cfg, dtype, kv_int8).items()}


# ---- streaming ---------------------------------------------------------------------------------------
# mistral-common's OFFLINE_STREAMING_BUFFER_TOKENS: right padding beyond delay + BOS, so a word
# spoken at the very end still gets its tokens.
RIGHT_PAD_BUFFER_TOKENS = 10
# Longest encoder call, in text tokens: bounds the attention scratch memory of a long feed(),
# and keeps the encoder within the audio ring's reach of the decoder.
MAX_TOKENS_PER_ENCODE = 32
# Delays Voxtral Realtime was trained on, in text tokens (80 ms each): 80..1200 ms and 2400 ms.
ALLOWED_DELAY_TOKENS = (*range(1, 16), 30)
DEFAULT_DELAY_MS = 480
# Silence tokens before the audio: mistral-common's 32; TrevorS' Q4_0 port found Q4_0 needs the
# whole 76-token streaming prefix to stay robust.
LEFT_PAD_TOKENS = 32
LEFT_PAD_TOKENS_Q4_0 = 76
MAX_LEFT_PAD_TOKENS = 4096


def delay_tokens(delay_ms, audio: AudioConfig = AudioConfig()) -> int:
    """Transcription delay in text tokens; raises for a delay the model was not trained on."""
    ms_per_token = 1000.0 / audio.frame_rate
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, (int, float, np.integer, np.floating)):
        raise VoxcError(f"delay_ms must be a number of milliseconds, not {type(delay_ms).__name__} {delay_ms!r}")
    n = float(delay_ms) / ms_per_token
    if not math.isfinite(n) or not math.isclose(n, round(n)) or int(round(n)) not in ALLOWED_DELAY_TOKENS:
        raise VoxcError(f"delay {delay_ms} ms is not supported: use 80..1200 ms in steps of {ms_per_token:g} ms, "
                        f"or 2400 ms")
    return int(round(n))


# Manifest field of an artifact whose weights work with one delay only (built from the transformers.js
# ONNX export, which folds the 480 ms delay conditioning into constants): that delay in ms, which is
# also streaming.default_delay_ms.  Absent from every other artifact.
FIXED_DELAY_FIELD = "fixed_delay_ms"


def fixed_delay_ms(manifest: dict, audio: AudioConfig = AudioConfig()) -> int | None:
    """The manifest's fixed delay (None for an artifact that runs every trained delay), checked."""
    value = manifest.get(FIXED_DELAY_FIELD)
    if value is None:
        return None
    default = manifest.get("streaming", {}).get("default_delay_ms")
    if isinstance(value, bool) or not isinstance(value, int) or value != default:
        raise VoxcError(f"{MANIFEST} is corrupt ({FIXED_DELAY_FIELD} is {value!r}, the default delay {default!r}); "
                        f"rebuild the artifact")
    delay_tokens(value, audio)
    return value


def stream_delay_tokens(delay_ms, audio: AudioConfig = AudioConfig(), fixed_ms: int | None = None) -> int:
    """:func:`delay_tokens` for an artifact whose weights may fix the delay at ``fixed_ms``."""
    n = delay_tokens(delay_ms, audio)
    if fixed_ms is not None and n != delay_tokens(fixed_ms, audio):
        raise VoxcError(f"this model works only with a {fixed_ms} ms delay, not {delay_ms} ms: it was built from an "
                        f"ONNX export that folds the delay into its weights. Build from the original checkpoint "
                        f"(consolidated.safetensors) for other delays")
    return n


def default_left_pad_tokens(quantization: str | None) -> int:
    return LEFT_PAD_TOKENS_Q4_0 if quantization == "q4_0" else LEFT_PAD_TOKENS


def check_left_pad_tokens(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_LEFT_PAD_TOKENS:
        raise VoxcError(f"left padding must be a whole number of tokens from 0 to {MAX_LEFT_PAD_TOKENS}, got {value!r}")
    return int(value)


def streaming_section(cfg: ModelConfig, *, left_pad_tokens: int, default_delay_ms: int) -> dict:
    """The manifest's ``streaming`` section: everything a session needs besides the model."""
    a = cfg.audio
    return {
        "left_pad_tokens": int(left_pad_tokens), "default_delay_ms": int(default_delay_ms),
        "sampling_rate": a.sampling_rate, "hop_length": a.hop_length, "window_size": a.window_size,
        "samples_per_token": a.samples_per_token, "mel_frames_per_token": a.mel_frames_per_token,
        "conv_stride": a.conv_stride, "downsample_factor": a.downsample_factor,
        "ms_per_token": 1000.0 / a.frame_rate, "allowed_delay_tokens": list(ALLOWED_DELAY_TOKENS),
        "audio_ring_rows": AUDIO_RING_ROWS, "max_tokens_per_encode": MAX_TOKENS_PER_ENCODE,
        "right_pad_buffer_tokens": RIGHT_PAD_BUFFER_TOKENS,
    }


# ---- CPU instruction sets ---------------------------------------------------------------------------
# LLVM feature name -> Linux /proc/cpuinfo flag, for the extensions that generated code may use
ISA_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
    "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "sve": "sve", "i8mm": "i8mm",
}


# ---- the manifest -----------------------------------------------------------------------------------
def new_manifest(*, target: str, device_kind: str, library: str, model_dtype: str, cfg: ModelConfig,
                 params: list[tuple[str, list[int], str]], quantization: str | None, left_pad_tokens: int,
                 default_delay_ms: int, tokenizer: str, voxc_version: str, tvm_version: str,
                 entries: list[str], kv_int8: tuple[str, ...] = (), **extras) -> dict:
    """A manifest without its ``files`` section (:func:`write_manifest` adds that)."""
    return {
        "format": FORMAT_VERSION,
        "voxc_version": voxc_version,
        "tvm_version": tvm_version,
        "target": target,
        "device_kind": device_kind,
        "library": library,
        "model_dtype": model_dtype,
        "quantization": quantization,
        "config": cfg.to_dict(),
        "functions": list(entries),
        "params": [{"name": n, "shape": [int(s) for s in sh], "dtype": str(d)} for n, sh, d in params],
        "weights": WEIGHT_INDEX,
        "tokenizer": tokenizer,
        "streaming": streaming_section(cfg, left_pad_tokens=left_pad_tokens, default_delay_ms=default_delay_ms),
        "kv_int8": list(kv_int8_towers(kv_int8)),
        "state": state_section(cfg, model_dtype, kv_int8),
        **extras,
    }


def file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest's content without its own checksum (a flipped bit in a setting such as
    left_pad_tokens would otherwise load as another valid value)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its checksum (write_manifest seals what it writes)."""
    return {**manifest, "manifest_sha256": manifest_checksum(manifest)}


def write_manifest(directory: Path, manifest: dict, *, hashes: bool = True) -> dict:
    """Record size and SHA-256 of every other file in ``directory`` and write the manifest.
    ``hashes=False`` records sizes only (weights written on a benchmark machine: load those with
    ``verify="size"``)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "files": {p.relative_to(directory).as_posix():
                                      file_record(p) if hashes else {"bytes": p.stat().st_size} for p in files}}
    manifest = seal(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def host_platform() -> str:
    """The platform native code runs on, as a vulkan/metal build records it (its host code and device
    plugin run only there): ``linux-x86_64``, ``darwin-arm64``."""
    machine = platform.machine().lower()
    return f"{sys.platform}-{ {'amd64': 'x86_64', 'aarch64': 'arm64'}.get(machine, machine) }"


# ---- reading --------------------------------------------------------------------------------------
# Each target's runtime device (a manifest pairing them otherwise is damaged: CPU code run as CUDA).
TARGET_DEVICE_KINDS = {"llvm": "cpu", "cuda": "cuda", "webgpu": "webgpu", "vulkan": "webgpu",
                       "metal": "webgpu"}
MODEL_DTYPES = ("float32", "float16", "bfloat16")
# Bounds that keep a damaged config from asking for absurd shapes (the 4B model is far below them).
_CONFIG_INT_LIMIT = 1 << 31
_CONFIG_LAYER_LIMIT = 4096


def _config_value_problem(value, kind: str, name: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"{name} is {value!r}, not a number"
    if kind == "int" and not isinstance(value, (int, np.integer)):
        return f"{name} is {value!r}, not a whole number"
    if not math.isfinite(value) or value <= 0:
        return f"{name} is {value!r}, not a positive number"
    if kind == "int" and value >= (_CONFIG_LAYER_LIMIT if name.endswith("n_layers") else _CONFIG_INT_LIMIT):
        return f"{name} is {value!r}, far beyond any model"
    return None


def _config_sections():
    from voxc.config import DecoderConfig, EncoderConfig
    return (("encoder", EncoderConfig), ("decoder", DecoderConfig), ("audio", AudioConfig))


def check_config(cfg: ModelConfig, source) -> ModelConfig:
    """``cfg`` validated, with every field of its declared type (whole numbers where the config has
    ints), finite, positive and within bounds; raises VoxcError naming ``source``.  Readers of
    untrusted files call this after building a config from them."""
    for section, cls in _config_sections():
        part = getattr(cfg, section)
        for field in dataclasses.fields(cls):
            problem = _config_value_problem(getattr(part, field.name), _type_name(field.type),
                                            f"{section}.{field.name}")
            if problem:
                raise VoxcError(f"{source}: invalid model config: {problem}")
    try:
        return cfg.validate()
    except VoxcError as exc:
        raise VoxcError(f"{source}: {exc}") from None


def config_from_dict(data, source) -> ModelConfig:
    """:meth:`ModelConfig.from_dict` for a config read from a file: every value type-checked first
    (see :func:`check_config`), every problem a VoxcError naming ``source``."""
    if not isinstance(data, dict) or any(not isinstance(data.get(k), dict) for k, _ in _config_sections()):
        raise VoxcError(f"{source}: the model config is not an object with encoder, decoder and audio sections")
    for section, cls in _config_sections():
        known = {f.name: _type_name(f.type) for f in dataclasses.fields(cls)}
        for key, value in data[section].items():
            if key not in known:
                raise VoxcError(f"{source}: unknown model config field {section}.{key}")
            problem = _config_value_problem(value, known[key], f"{section}.{key}")
            if problem:
                raise VoxcError(f"{source}: invalid model config: {problem}")
    try:
        cfg = ModelConfig.from_dict(data)
    except VoxcError as exc:
        raise VoxcError(f"{source}: {exc}") from None
    return check_config(cfg, source)


def _safe_name(name) -> bool:
    """A file name inside the artifact: relative, no '..', no backslashes or NULs."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _plain_dtype(name: str) -> bool:
    """A numeric dtype a weight can have (not object, string, structured or void)."""
    if name == "bfloat16":
        return True
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        return False
    return dtype.kind in "biuf" and dtype.fields is None and dtype.subdtype is None and dtype.name == name


def _type_name(annotation) -> str:
    return annotation if isinstance(annotation, str) else annotation.__name__


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_manifest(path: Path, m: dict) -> None:
    def bad(what: str):
        raise VoxcError(f"{path} is corrupt ({what}); rebuild the artifact")

    for key in ("target", "device_kind", "library", "model_dtype", "weights", "tokenizer"):
        if not isinstance(m[key], str):
            bad(f"{key} is {m[key]!r}, not a string")
    if TARGET_DEVICE_KINDS.get(m["target"]) is None:
        bad(f"unknown target {m['target']!r}")
    if TARGET_DEVICE_KINDS[m["target"]] != m["device_kind"]:
        bad(f"target {m['target']} runs on {TARGET_DEVICE_KINDS[m['target']]}, not on {m['device_kind']!r}")
    if m["model_dtype"] not in MODEL_DTYPES:
        bad(f"model_dtype {m['model_dtype']!r} is not one of {', '.join(MODEL_DTYPES)}")

    files = m["files"]
    if not isinstance(files, dict):
        bad("the file list is not an object")
    for name, record in files.items():
        if not _safe_name(name) or name == MANIFEST:
            bad(f"the file list names {name!r}")
        if not isinstance(record, dict) or not _is_count(record.get("bytes")):
            bad(f"the size of {name} is missing or not a whole number")
        sha = record.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                    and all(c in "0123456789abcdef" for c in sha)):
            bad(f"the SHA-256 of {name} is {sha!r}")
    for key in ("library", "weights", "tokenizer"):
        if m[key] not in files:
            bad(f"{key} {m[key]!r} is not one of its files")

    cfg = config_from_dict(m["config"], path)

    params = m["params"]
    if not isinstance(params, list):
        bad("params is not a list")
    names = set()
    for p in params:
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
                and all(_is_count(s) for s in p["shape"]) and isinstance(p.get("dtype"), str)):
            bad(f"parameter entry {str(p)[:80]} is not {{name, shape, dtype}}")
        if p["name"] in names:
            bad(f"parameter {p['name']} is listed twice")
        names.add(p["name"])
        if not _plain_dtype(p["dtype"]):
            bad(f"parameter {p['name']} has the unknown dtype {p['dtype']!r}")

    functions = m["functions"]
    if not isinstance(functions, list) or not all(isinstance(f, str) for f in functions) \
            or not set(ENTRY_POINTS) <= set(functions):
        bad(f"functions {str(functions)[:80]} lack the entry points {', '.join(ENTRY_POINTS)}")

    streaming = m["streaming"]
    if not isinstance(streaming, dict):
        bad("streaming is not an object")
    try:
        left_pad = check_left_pad_tokens(streaming.get("left_pad_tokens"))
        delay_ms = streaming.get("default_delay_ms")
        if not isinstance(delay_ms, int):
            raise VoxcError(f"default_delay_ms is {delay_ms!r}, not a whole number of milliseconds")
        delay_tokens(delay_ms, cfg.audio)
    except VoxcError as exc:
        bad(f"streaming: {exc}")
    want = json.loads(json.dumps(streaming_section(cfg, left_pad_tokens=left_pad, default_delay_ms=delay_ms)))
    if streaming != want:
        wrong = sorted(k for k in set(want) | set(streaming) if want.get(k, ...) != streaming.get(k, ...))
        bad(f"streaming {', '.join(wrong)} disagree with the model config")
    kv_int8 = m.get("kv_int8", [])   # absent: an artifact from before 8-bit caches (all float)
    if not (isinstance(kv_int8, list) and all(isinstance(t, str) for t in kv_int8)):
        bad(f"kv_int8 is {str(kv_int8)[:80]}, not a list of towers")
    try:
        ordered = list(kv_int8_towers(kv_int8))
    except VoxcError as exc:
        bad(f"kv_int8: {exc}")
    if ordered != kv_int8:
        bad(f"kv_int8 {kv_int8} is not an ordered list of {', '.join(KV_TOWERS)}")
    want = json.loads(json.dumps(state_section(cfg, m["model_dtype"], tuple(kv_int8))))
    for name, spec in want.items():
        # artifacts built before the growth headroom was recorded (voxc.js then grows by doubling)
        if "growth_headroom" not in (m["state"].get(name) or {}):
            spec.pop("growth_headroom", None)
    if m["state"] != want:
        bad("the state section disagrees with the model config and dtype")

    cpu = m.get("cpu")
    if cpu is not None and not (isinstance(cpu, dict) and isinstance(cpu.get("isa", []), list)
                                and all(isinstance(f, str) for f in cpu.get("isa", []))
                                and isinstance(cpu.get("mcpu"), (str, type(None)))):
        bad(f"cpu is {str(cpu)[:80]}, not {{mcpu, isa}}")


def read_manifest(directory: Path) -> dict:
    """The manifest of the artifact in ``directory``, checked for format, completeness and
    consistency: every value the runtime uses has its type, the files it names are in the checksummed
    file list, and the derived sections (state, streaming constants) agree with the model config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VoxcError(f"{directory} is not a directory: give the artifact directory `voxc build` wrote"
                        if directory.exists() else f"{directory} does not exist")
    path = directory / MANIFEST
    if not path.exists():
        raise VoxcError(f"{directory} is not a voxc artifact (no {MANIFEST}); make one with `voxc build`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VoxcError(f"{path} is corrupt ({exc}); rebuild the artifact") from exc
    except OSError as exc:
        raise VoxcError(f"{path} is unreadable ({exc})") from exc
    if not isinstance(manifest, dict):
        raise VoxcError(f"{path} is corrupt (not a JSON object); rebuild the artifact")
    if manifest.get("format") != FORMAT_VERSION:
        raise VoxcError(f"{directory} was built by an incompatible voxc (artifact format {manifest.get('format')!r}, "
                        f"this voxc reads {FORMAT_VERSION}); rebuild it with `voxc build`")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise VoxcError(f"{path} is damaged: its content does not match its checksum; rebuild the artifact")
    required = ("target", "device_kind", "library", "model_dtype", "config", "params", "weights", "tokenizer",
                "streaming", "state", "functions", "files")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise VoxcError(f"{path} is corrupt (lacks {', '.join(missing)}); rebuild the artifact")
    _check_manifest(path, manifest)
    return manifest


def verify_files(directory: Path, manifest: dict, *, hashes: bool) -> None:
    """Every file the manifest lists exists with its size (and, with ``hashes``, its SHA-256);
    raises naming the first damaged file."""
    directory = Path(directory)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_safe_name(n) and isinstance(r, dict) for n, r in files.items()):
        raise VoxcError(f"{directory / MANIFEST} is corrupt (no valid file list); rebuild the artifact")
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            raise VoxcError(f"artifact {directory} is incomplete: {name} is missing; rebuild it")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise VoxcError(f"artifact file {path} is damaged: {size} bytes, the manifest says {record.get('bytes')}; "
                            f"rebuild the artifact")
        if hashes and file_record(path)["sha256"] != record.get("sha256"):
            raise VoxcError(f"artifact file {path} is damaged: its SHA-256 differs from the manifest's; "
                            f"rebuild the artifact")


# ---- weights ----------------------------------------------------------------------------------------
def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class WeightShardWriter:
    """Weights as ``tensor-cache.json`` + ``params_shard_<i>.bin`` (tvmjs's tensor cache, "raw"
    records), written tensor by tensor so a model larger than memory streams through.  Records
    start at 4-byte offsets (WebGPU copies need them).  A tensor above half of ``shard_bytes`` gets
    a shard of its own.  Every target writes its weights with this one writer."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.cap = Path(out), int(shard_bytes)
        self.shards: list[dict] = []
        self._file = None
        self._records: list[dict] = []
        self._size = 0
        self.total_bytes = 0
        self.largest_bytes = 0
        self.count = 0

    def _open(self):
        self._name = SHARD_NAME.format(len(self.shards))
        self._file = open(self.out / self._name, "wb")
        self._size, self._records, self._md5 = 0, [], hashlib.md5()

    def _close(self):
        if self._file is None:
            return
        self._file.close()
        self.shards.append({"dataPath": self._name, "format": "raw-shard", "nbytes": self._size,
                            "records": self._records, "md5sum": self._md5.hexdigest()})
        self._file = None

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        data = memoryview(array).cast("B") if array.size else b""
        nbytes = array.nbytes
        big = nbytes > self.cap // 2
        if self._file is not None and (big or self._size + nbytes > self.cap):
            self._close()
        if self._file is None:
            self._open()
        pad = (-self._size) % 4
        if pad:
            self._file.write(b"\0" * pad)
            self._md5.update(b"\0" * pad)
            self._size += pad
        self._records.append({"name": name, "shape": [int(s) for s in array.shape], "dtype": str(array.dtype),
                              "format": "raw", "nbytes": nbytes, "byteOffset": self._size})
        self._file.write(data)
        self._md5.update(data)
        self._size += nbytes
        self.total_bytes += nbytes
        self.largest_bytes = max(self.largest_bytes, nbytes)
        self.count += 1
        if big:
            self._close()

    def finish(self) -> None:
        self._close()
        index = {"metadata": {"ParamSize": self.count, "ParamBytes": self.total_bytes}, "records": self.shards}
        (self.out / WEIGHT_INDEX).write_text(json.dumps(index))


def read_weights(directory: Path, manifest: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The artifact's weights as (name, read-only memory-mapped array), checked against the manifest's
    parameter list: every parameter once, in the manifest's order (the order the compiled functions
    take them in), with its shape and dtype, the records packed as the writer packs them."""
    directory = Path(directory)
    index_path = directory / manifest["weights"]
    try:
        index = json.loads(index_path.read_text())
        shards = index["records"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise VoxcError(f"artifact weight index {index_path} is unreadable ({exc}); rebuild the artifact") from exc

    def damaged(what: str):
        return VoxcError(f"artifact weight index {index_path} is damaged ({what}); rebuild the artifact")

    if not isinstance(shards, list):
        raise damaged("records is not a list")
    params = manifest["params"]
    files = manifest.get("files", {})
    i = 0
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("records"), list):
            raise damaged("a shard without a record list")
        data_path = shard.get("dataPath")
        if not _safe_name(data_path) or data_path not in files:
            raise damaged(f"shard file {str(data_path)[:80]!r} is not one of the artifact's files")
        path = directory / data_path
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        except (OSError, ValueError) as exc:
            raise VoxcError(f"artifact weight file {path} is unreadable ({exc}); rebuild the artifact") from exc
        if shard.get("nbytes") != data.shape[0]:
            raise VoxcError(f"artifact weight file {path} is damaged: {data.shape[0]} bytes, its index says "
                            f"{shard.get('nbytes')!r}; rebuild the artifact")
        end = 0
        for rec in shard["records"]:
            if not isinstance(rec, dict):
                raise damaged(f"a record of {data_path} is not an object")
            name = rec.get("name")
            spec = params[i] if i < len(params) else None
            shape = rec.get("shape")
            if spec is None or name != spec["name"] or not isinstance(shape, list) \
                    or not all(_is_count(s) for s in shape) or shape != spec["shape"] or rec.get("dtype") != spec["dtype"]:
                want = "no more tensors" if spec is None else f"{spec['name']} {spec['shape']} {spec['dtype']}"
                raise VoxcError(f"artifact {directory}: weight record {str(name)[:80]} does not match the manifest "
                                f"(parameter {i} is {want}); rebuild it")
            dtype = numpy_dtype(rec["dtype"])
            start, nbytes = rec.get("byteOffset"), rec.get("nbytes")
            if not (_is_count(start) and _is_count(nbytes)) or start != end + (-end) % 4 \
                    or nbytes != math.prod(rec["shape"]) * dtype.itemsize or start + nbytes > data.shape[0]:
                raise VoxcError(f"artifact weight file {path} is truncated or damaged at {name}; rebuild the artifact")
            end = start + nbytes
            i += 1
            yield name, data[start:end].view(dtype).reshape(rec["shape"])
    if i < len(params):
        missing = [p["name"] for p in params[i:]]
        raise VoxcError(f"artifact {directory} lacks weights: {', '.join(missing[:5])}; rebuild it")


def _stamp_file(directory: Path) -> Path:
    cache = Path(os.environ.get("VOXC_CACHE_DIR", Path.home() / ".cache" / "voxc")) / "verified"
    return cache / hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:32]


def is_verified(directory: Path, manifest: dict) -> bool:
    """Whether the files are as they were when last hashed against the manifest (sizes and
    modification times unchanged since :func:`record_verified`)."""
    try:
        return _stamp_file(directory).read_text() == verified_stamp(directory, manifest)
    except OSError:
        return False


def record_verified(directory: Path, manifest: dict) -> None:
    """Note that the files now match the manifest's hashes (in the user's cache; a read-only home
    just means every load hashes)."""
    stamp_file = _stamp_file(directory)
    try:
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp_file.with_suffix(f".{os.getpid()}")
        tmp.write_text(verified_stamp(directory, manifest))
        os.replace(tmp, stamp_file)
    except OSError:
        pass


def verified_stamp(directory: Path, manifest: dict) -> str:
    """A fingerprint of the files as they are now (names, sizes, modification times): a load that
    finds the same stamp as the one written after the last full check skips re-hashing."""
    h = hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode())
    for name in sorted(manifest.get("files", {})):
        st = os.stat(Path(directory) / name)
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    return h.hexdigest()
