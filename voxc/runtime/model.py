"""A loaded artifact: weights on the device, the VM's entry points, and the KV caches.

The state is allocated per model for ``max_streams`` sequences (one slot each; voxc.artifact.state_layout).
The KV caches are paged (voxc.runtime.kv_pages): per tower one pool per layer of pages of 64 ring rows
(the encoder's ``[n_pages, 2, 64, H, D]`` for its 750-row window, the decoder's ``[n_pages, 2, 64, Hkv, D]``
for 8192 rows) and a page table; :meth:`CompiledModel.encode` and :meth:`CompiledModel.decode` hand
pages to the rows a step writes, so KV memory follows the audio each stream has heard.  Every entry
point takes a batch of slots, so the server can decode many streams in one step; a
:class:`~voxc.runtime.session.StreamingSession` is one slot.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from voxc import artifact
from voxc.artifact import DECODE_B1N1, ENCODE_B1T8, ISA_FLAGS
from voxc.config import ModelConfig
from voxc.errors import VoxcError
from voxc.runtime.kv_pages import KvPages
from voxc.runtime.tvm_runtime import Runtime, preload_native

log = logging.getLogger("voxc")

VERIFY_MODES = ("auto", "full", "size")


def host_cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); None if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def check_cpu_isa(artifact_dir: Path, cpu: dict | None) -> None:
    """Refuse an llvm artifact whose code uses instructions this CPU lacks (it would die of SIGILL)."""
    flags = host_cpu_flags()
    if not cpu or flags is None:
        return
    missing = [f for f in cpu.get("isa", []) if ISA_FLAGS.get(f) and ISA_FLAGS[f] not in flags]
    if missing:
        raise VoxcError(f"{artifact_dir} was compiled for the CPU {cpu.get('mcpu')!r} and uses {', '.join(missing)}, "
                        f"which this CPU lacks; rebuild it here (`voxc build --target llvm`, which compiles for "
                        f"this CPU) or with `--cpu generic` for any CPU")


# How messages name each paged cache.
KV_CACHE_NAMES = {"enc_cache": "the encoder's KV cache", "dec_cache": "the decoder's KV cache"}


class CompiledModel:
    def __init__(self, artifact_dir: Path, manifest: dict, runtime: Runtime, max_streams: int, progress: bool,
                 kv_pages=None):
        from tqdm import tqdm

        from voxc.tokenizer import Tokenizer

        self.artifact_dir = artifact_dir
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["config"])
        self.rt = runtime
        preload_native(manifest.get("native_libraries", ()))
        self.vm = runtime.load_vm(artifact_dir / manifest["library"])
        self.tokenizer = Tokenizer(artifact_dir / manifest["tokenizer"])
        streaming = manifest["streaming"]
        self.left_pad_tokens = int(streaming["left_pad_tokens"])
        self.default_delay_ms = int(streaming["default_delay_ms"])
        # weights that fix the delay (an ONNX export's) refuse any other one
        self.fixed_delay_ms = artifact.fixed_delay_ms(manifest, self.config.audio)
        self.dtype = manifest["model_dtype"]

        order = {p["name"]: i for i, p in enumerate(manifest["params"])}
        self.params = [None] * len(order)
        for name, array in tqdm(artifact.read_weights(artifact_dir, manifest), total=len(order),
                                desc="loading weights", unit="tensor", disable=not progress):
            self.params[order[name]] = runtime.tensor(array)

        self._mel = self.vm["mel"]
        self._encode = self.vm["encode"]
        self._encode_stages = self.vm["encode_stages"]
        self._set_delay = self.vm["set_delay"]
        self._decode = self.vm["decode"]
        # Targets may add a static-shape copy of decode for one stream and one token (faster kernels).
        self.use_static_entries(True)
        # one-token steps on a GPU replay a CUDA graph (VOXC_CUDA_GRAPHS=0: launch kernel by kernel)
        self.cuda_graphs = runtime.kind == "cuda" and os.environ.get("VOXC_CUDA_GRAPHS", "1") != "0"
        self._graph_inputs = None
        self._decode_captured = None
        self.cuda_graph_replays = 0     # one-token steps run from a captured graph (benchmarks report it)
        self._encode_single_mel = (1, self.config.encoder.num_mel_bins, ENCODE_B1T8.dim("t"))
        self._view = runtime.ffi.get_global_func("runtime.TVMTensorCreateView")
        self.max_streams = max_streams
        self.slots = SlotPool(max_streams, on_release=self._release_pages)
        self.audio_ring_rows = artifact.AUDIO_RING_ROWS
        self.state_layout = artifact.state_layout(self.config, artifact.manifest_kv_int8(manifest))
        paged = artifact.paged_entries(self.state_layout)
        initial = _initial_kv_pages(kv_pages, None, paged, max_streams)
        # the KV caches: per tower a pool of pages per layer (separately allocated tensors, so each
        # layer's kernels bind a buffer of their own: WebGPU/Vulkan limit one binding's size)
        self.kv = {name: KvPages(runtime, entry, self.dtype, max_streams, what=KV_CACHE_NAMES.get(name, name),
                                 initial_pages=initial[name]) for name, entry in paged.items()}
        for pool in self.kv.values():
            pool.on_grow.append(self._drop_captured_step)
        self._tables = {entry.page_table: name for name, entry in paged.items()}
        for name, entry in self.state_layout.items():   # one slot per stream
            if entry.paged or name in self._tables:
                continue
            setattr(self, name, runtime.zeros(entry.concrete_shape(max_streams), entry.dtype_for(self.dtype)))

    # ---- the paged KV caches ------------------------------------------------------------------
    @property
    def enc_cache(self) -> list:
        return self.kv["enc_cache"].tensors

    @property
    def dec_cache(self) -> list:
        return self.kv["dec_cache"].tensors

    @property
    def enc_pages(self):
        return self.kv["enc_cache"].table

    @property
    def dec_pages(self):
        return self.kv["dec_cache"].table

    @property
    def kv_bytes_in_use(self) -> int:
        """Bytes of KV-cache pages the streams hold (both towers, all layers)."""
        return sum(pool.bytes_in_use for pool in self.kv.values())

    @property
    def kv_bytes_allocated(self) -> int:
        """Bytes of the KV-cache pools on the device (both towers, all layers)."""
        return sum(pool.bytes_allocated for pool in self.kv.values())

    def kv_stats(self) -> dict:
        """Per tower: page size, pages in use / in the pool / at most, bytes in use / allocated / at most."""
        return {name: {"page_rows": pool.page_rows, "pages_in_use": pool.pages_in_use, "pages": pool.size,
                       "max_pages": pool.max_pages, "bytes_in_use": pool.bytes_in_use,
                       "bytes_allocated": pool.bytes_allocated, "max_bytes": pool.max_bytes, "growths": pool.growths}
                for name, pool in self.kv.items()}

    def take_kv_pages(self, slots, positions, cache: str = "dec_cache") -> None:
        """Give streams ``slots`` the pages of ``cache`` for positions 0 .. ``positions`` - 1, as if they had
        run there: a benchmark that decodes from position 4000 straight away then reads 4000 keys from
        distinct pages (its own), as a stream that got there would, not one shared unreached page."""
        pool = self.kv[cache]
        for slot, position in zip(np.atleast_1d(slots).tolist(), np.broadcast_to(positions, np.shape(slots)).tolist()):
            pool.ensure([slot], [0], int(position))

    def release_kv_pages(self, slots) -> None:
        """Give back every KV page streams ``slots`` hold (the counterpart of :meth:`take_kv_pages` for a
        benchmark that used slots without streams; a stream's pages go back when it ends)."""
        for slot in np.atleast_1d(slots).tolist():
            self._release_pages(int(slot))

    def _release_pages(self, slot: int) -> None:
        for pool in self.kv.values():
            pool.release(slot)

    def release_cached_memory(self) -> bool:
        """Give the device memory the VM's allocator keeps for reuse (the freed buffers of every batch
        shape run so far) back to the driver.  A captured CUDA graph replays into such buffers, so it
        goes first (the next one-stream step captures again).  False where the runtime cannot."""
        self._drop_captured_step()
        return self.rt.release_cached_memory()

    def _drop_captured_step(self) -> None:
        """A pool is about to be replaced: a captured step (which holds the old tensors) goes."""
        if self._decode_captured is not None:
            self._decode_captured.close()
            self._decode_captured = None

    @classmethod
    def load(cls, artifact_dir, device: str | None = None, *, max_streams: int = 1, progress: bool = False,
             verify: str = "auto", kv_pages=None, kv_seconds: float | None = None):
        """``verify``: ``auto`` checks every file's size, and its SHA-256 on the first load (and again
        whenever a file changed since); ``full`` hashes every time; ``size`` never hashes.

        ``kv_pages``: the KV-cache pools' first size in pages (of 64 ring rows), one number for both
        towers or ``{"enc_cache": n, "dec_cache": m}``; by default enough for the first 4 s of each of
        ``max_streams`` streams (voxc.artifact.KV_INITIAL_SECONDS).  Pools grow (by what is missing plus
        a quarter) as streams need pages, up to every stream's whole window.  ``kv_seconds`` instead: pools
        that start with room for that many seconds of audio, plus the padding a stream adds, for each of
        ``max_streams`` streams (a growth
        copies every layer's pool: at 192 streams on an H100 one took a 255 ms step; a server that sizes
        its pools for its sessions at load never waits for one while they stay within it)."""
        artifact_dir = Path(artifact_dir)
        if verify not in VERIFY_MODES:
            raise VoxcError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        if isinstance(max_streams, bool) or not isinstance(max_streams, (int, np.integer)) or max_streams < 1:
            raise VoxcError(f"max_streams must be a whole number >= 1, not {max_streams!r}")
        manifest = artifact.read_manifest(artifact_dir)
        kind = manifest["device_kind"]
        if device is not None and device not in (kind, manifest["target"]) and not (device == "cpu" and kind == "llvm"):
            raise VoxcError(f"{artifact_dir} was built for {manifest['target']} and runs on {kind}, not {device}")
        if kind == "webgpu" and not manifest.get("wgpu"):
            raise VoxcError(f"{artifact_dir} is a web bundle: serve it and open index.html in a browser")
        verify_artifact(artifact_dir, manifest, verify)
        if kind == "cpu":
            check_cpu_isa(artifact_dir, manifest.get("cpu"))
        if kind == "webgpu":   # vulkan/metal: the artifact's plugin provides the device
            from voxc.runtime.wgpu_device import open_wgpu_device

            open_wgpu_device(artifact_dir, manifest, int(max_streams))
        name = manifest["wgpu"].get("backend", manifest["target"]) if manifest.get("wgpu") else kind
        # the pools' first sizes, checked before the runtime starts and the weights load
        paged = artifact.paged_entries(artifact.state_layout(ModelConfig.from_dict(manifest["config"]),
                                                             artifact.manifest_kv_int8(manifest)))
        kv_pages = _initial_kv_pages(kv_pages, kv_seconds, paged, int(max_streams),
                                     padding_seconds=stream_padding_seconds(manifest["streaming"]))
        return cls(artifact_dir, manifest, Runtime(kind, name=name), int(max_streams), progress, kv_pages)

    @property
    def functions(self) -> list[str]:
        """The artifact's entry points (voxc.artifact.ENTRY_POINTS and the target's static copies)."""
        return list(self.manifest["functions"])

    def use_static_entries(self, enabled: bool = True) -> None:
        """Run one-stream steps through the static-shape entries (decode_b1n1, encode_b1t8) where the
        artifact has them (the default), or always through the generic ones (to compare the two)."""
        self._decode_single = _optional_function(self.vm, DECODE_B1N1.name) if enabled else None
        self._encode_single = _optional_function(self.vm, ENCODE_B1T8.name) if enabled else None

    # ---- streaming --------------------------------------------------------------------------
    def stream(self, delay_ms: int | None = None, *, left_pad_tokens: int | None = None):
        from voxc.runtime.session import StreamingSession

        return StreamingSession(self, delay_ms=self.default_delay_ms if delay_ms is None else delay_ms,
                                left_pad_tokens=self.left_pad_tokens if left_pad_tokens is None else left_pad_tokens)

    def transcribe(self, audio, delay_ms: int | None = None) -> str:
        """Whole-clip transcription: the streaming session fed all audio at once (same numbers)."""
        from voxc.runtime.session import check_pcm

        if check_pcm(audio).size == 0:
            raise VoxcError("the audio is empty: nothing to transcribe")
        session = self.stream(delay_ms)
        text = session.feed(audio)
        return text + session.finish()

    # ---- entry points: host arrays in, device tensors out; state stays on the device ---------
    def reset_slot(self, slot: int, delay_tokens: int) -> None:
        """A new stream starts from silence: zero its conv-stem context (the reference's zero padding),
        and condition its decoder on its delay (the per-layer scales every decode step of it reads).

        Its KV-cache pages (a previous stream's) go back to the pools; its audio rows need no clearing:
        positions before the stream's start are masked.
        """
        self._release_pages(slot)
        self.set_delay([slot], [delay_tokens])
        for state in (self.conv0_state, self.conv1_state):
            row_shape = tuple(state.shape[1:])
            row = self._view(state, self.rt.ffi.Shape(row_shape), state.dtype,
                             slot * int(np.prod(row_shape)) * np.dtype(self.dtype).itemsize)
            self.rt.copy_into(row, np.zeros(row_shape, self.dtype))

    def set_delay(self, slots, delays) -> None:
        """Condition streams ``slots`` on their delays (in tokens): their decoder's per-layer ada-norm
        scales, which every later decode step of theirs reads."""
        self.delay_scales = self._set_delay(self.rt.tensor(np.asarray(delays, np.float32)), self.delay_scales,
                                            self.rt.tensor(np.asarray(slots, np.int32)), *self.params)

    def mel(self, windows: np.ndarray):
        """PCM windows [b, n] (or [n]) -> log-mel [b, n_mels, frames] on the device."""
        windows = np.ascontiguousarray(np.atleast_2d(windows), dtype=np.float32)
        return self._mel(self.rt.staged("mel_windows", windows), *self.params)

    def encode(self, mel, slots, starts, stages: bool = False):
        """Encode mel [b, n_mels, 8k] for streams ``slots`` at encoder positions ``starts``.

        Returns None, or with ``stages`` (conv-stem frames, encoder output, audio embeddings).
        """
        fn = self._encode_stages if stages else self._encode
        if not stages and self._encode_single is not None and tuple(mel.shape) == self._encode_single_mel:
            fn = self._encode_single
        pool = self.kv["enc_cache"]
        pool.ensure(slots, starts, int(mel.shape[2]) // self.config.audio.conv_stride)
        out = fn(mel, self.conv0_state, self.conv1_state, pool.tensors, pool.table, self.audio_ring,
                 self.rt.staged("encode_slots", np.asarray(slots, np.int32)),
                 self.rt.staged("encode_starts", np.asarray(starts, np.int32)), *self.params)
        self.conv0_state, self.conv1_state, self.audio_ring = out[0], out[1], out[3]
        pool.tensors = list(out[2])   # the per-layer caches come back as a tuple (the same tensors)
        return (out[4], out[5], out[6]) if stages else None

    def decode(self, tokens: np.ndarray, slots, starts):
        """Decode tokens [b, n] of streams ``slots`` (each conditioned on its delay by reset_slot) at
        positions ``starts``; returns (logits [b, vocab], greedy tokens [b])."""
        tokens = np.asarray(tokens, np.int32)
        pool = self.kv["dec_cache"]
        pool.ensure(slots, starts, tokens.shape[1])
        if tokens.shape == (1, 1) and self._decode_single is not None and self.cuda_graphs:
            return self._decode_graph(tokens, slots, starts)
        fn = self._decode_single if tokens.shape == (1, 1) and self._decode_single is not None else self._decode
        logits, next_tokens, dec_cache = fn(
            self.rt.staged("decode_tokens", tokens), self.audio_ring, self.delay_scales, pool.tensors, pool.table,
            self.rt.staged("decode_slots", np.asarray(slots, np.int32)),
            self.rt.staged("decode_starts", np.asarray(starts, np.int32)),
            *self.params)
        pool.tensors = list(dec_cache)   # the per-layer caches come back as a tuple (the same tensors)
        return logits, next_tokens

    def _decode_graph(self, tokens, slots, starts):
        """A one-stream, one-token step replayed from a CUDA graph of decode_b1n1 (voxc.runtime.cuda_graph)."""
        from voxc.runtime.cuda_graph import CapturedStep

        if self._graph_inputs is None:
            self._graph_inputs = [self.rt.tensor(np.zeros(s, d)) for s, d in
                                  (((1, 1), np.int32), ((1,), np.int32), ((1,), np.int32))]
        tok, slt, pos = self._graph_inputs
        for tensor, value, dtype in ((tok, tokens, np.int32), (slt, slots, np.int32), (pos, starts, np.int32)):
            self.rt.copy_into(tensor, np.asarray(value, dtype).reshape(tuple(tensor.shape)))
        pool = self.kv["dec_cache"]
        # the page table is one tensor for the model's life (rewritten in place), the pools change
        # when they grow: a grown pool means a new capture
        args = [tok, self.audio_ring, self.delay_scales, pool.tensors, pool.table, slt, pos]
        if self._decode_captured is None or not self._decode_captured.matches(args):
            if self._decode_captured is not None:
                self._decode_captured.close()
            try:
                self._decode_captured = CapturedStep(self.rt, self._decode_single, args, self.params)
            except VoxcError as exc:   # a step that cannot be captured runs as before
                log.warning("%s; one-stream steps run without CUDA graphs", exc)
                self.cuda_graphs = False
                self._decode_captured = None
                return self.decode(tokens, slots, starts)
        logits, next_tokens, dec_cache = self._decode_captured.replay()
        pool.tensors = list(dec_cache)
        self.cuda_graph_replays += 1
        return logits, next_tokens

    def delay_tokens(self, delay_ms: int) -> int:
        return artifact.stream_delay_tokens(delay_ms, self.config.audio, self.fixed_delay_ms)


def verify_artifact(artifact_dir: Path, manifest: dict, mode: str = "auto") -> None:
    """Check the artifact's files against its manifest (see CompiledModel.load's ``verify``).  A
    full check, or the build itself, leaves a stamp of the files' sizes and modification times in the
    user's cache, so loads of unchanged files skip hashing (0.5-1.5 s per GB on a server CPU)."""
    artifact.verify_files(artifact_dir, manifest, hashes=False)
    if mode == "size" or (mode == "auto" and artifact.is_verified(artifact_dir, manifest)):
        return
    artifact.verify_files(artifact_dir, manifest, hashes=True)
    artifact.record_verified(artifact_dir, manifest)


def _optional_function(vm, name: str):
    try:
        return vm[name]
    except Exception:  # tvm_ffi raises its own error type for a missing function
        return None


def stream_padding_seconds(streaming: dict) -> float:
    """Seconds of padding a stream's positions hold besides its audio, at most: the left padding its
    session feeds first, and at its end the right padding of the longest delay plus the last partial
    token (runtime.session: StreamingSession.end): 74 tokens (5.9 s) with 32 tokens of left padding."""
    tokens = (int(streaming["left_pad_tokens"]) + max(streaming["allowed_delay_tokens"]) + 1
              + int(streaming["right_pad_buffer_tokens"]) + 1)
    return tokens * float(streaming["ms_per_token"]) / 1000.0


def _initial_kv_pages(kv_pages, kv_seconds, paged: dict, max_streams: int, padding_seconds: float = 0.0) -> dict:
    """CompiledModel.load's ``kv_pages`` or ``kv_seconds`` as {cache name: initial pages or None (the
    default)}; ``paged``: the paged state entries.  ``kv_seconds`` counts audio: the pools also hold
    ``padding_seconds`` more of positions (the stream's padding), so that a stream of that many seconds
    never grows them (at 224 streams on an H100 the decoder's pool, sized for the audio alone, grew at
    59 s of 60: one step of 1.7 s)."""
    names = list(paged)
    if kv_seconds is not None:
        if kv_pages is not None:
            raise VoxcError("give the KV pools' first size as kv_pages or as kv_seconds, not both")
        if isinstance(kv_seconds, bool) or not isinstance(kv_seconds, (int, float, np.integer, np.floating)) \
                or not math.isfinite(kv_seconds) or kv_seconds <= 0:
            raise VoxcError(f"kv_seconds must be a positive number of seconds, not {kv_seconds!r}")
        return {name: max_streams * entry.pages_for_seconds(float(kv_seconds) + padding_seconds)
                for name, entry in paged.items()}
    if kv_pages is None or (isinstance(kv_pages, (int, np.integer)) and not isinstance(kv_pages, bool)):
        return {name: kv_pages for name in names}
    if isinstance(kv_pages, dict) and set(kv_pages) <= set(names):
        return {name: kv_pages.get(name) for name in names}
    raise VoxcError(f"kv_pages must be a number of pages or a dict with keys among {', '.join(names)}, "
                    f"not {kv_pages!r}")


class SlotPool:
    """Cache rows handed to sessions; a finished session's row is reused (its old keys are masked out).
    ``on_release(slot)``: called when a slot comes back (the model frees its KV pages)."""

    def __init__(self, size: int, on_release=None):
        self.free = list(range(size))
        self.on_release = on_release

    def acquire(self) -> int:
        if not self.free:
            raise VoxcError("all stream slots of this model are in use; load it with a larger max_streams")
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        if self.on_release is not None:
            self.on_release(slot)
        self.free.append(slot)
