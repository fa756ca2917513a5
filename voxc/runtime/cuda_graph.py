"""One CUDA graph per static-shape step: a one-token decode step launches ~500 small kernels, and at
batch 1 the launches, not the weight reads, set its time (bench/RESULTS.md).  :class:`CapturedStep`
runs a VM function once on its own stream to warm TVM's memory pool, captures a second run as a
CUDA graph, and replays the whole step with one launch from then on.

A replay reuses every buffer address of the capture, so the step's inputs live in tensors owned by
the capture (the caller copies new values into them before each replay) and its state arguments
(caches, page table, audio ring) must be the same tensors on every call: :meth:`CapturedStep.matches`
checks that (every tensor of a per-layer cache list too), and the caller captures again when they
changed (a KV page pool that grew is a new tensor per layer; the page table is rewritten in place).  Only the CUDA runtime (libcudart, which
TVM's CUDA runtime already loaded) is used, through ctypes.
"""
from __future__ import annotations

import ctypes

from voxc.errors import VoxcError

_STREAM_NON_BLOCKING = 0x1
# Relaxed: a cudaMalloc inside the capture is allowed (the thread-local and global modes refuse it).
# TVM's memory pool may still need a fresh block for the captured run although the warm-up run just
# returned its buffers (a server that has run many batch shapes fragments the pool: seen on an H100,
# where every one-stream capture failed after the server's warm-up).  The block stays in the pool,
# so the graph's addresses stay valid, as for the blocks the warm-up allocated.  Other threads' CUDA
# calls are not part of the capture in any mode (a non-blocking stream of our own).
_CAPTURE_MODE_RELAXED = 2


def _cudart():
    try:
        lib = ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise VoxcError(f"CUDA graphs need libcudart.so.13: {exc}") from exc
    for name in ("cudaStreamCreateWithFlags", "cudaStreamSynchronize", "cudaStreamBeginCapture",
                 "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch", "cudaGraphExecDestroy",
                 "cudaGraphDestroy", "cudaStreamDestroy", "cudaGetErrorString"):
        getattr(lib, name).restype = ctypes.c_char_p if name == "cudaGetErrorString" else ctypes.c_int
    return lib


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        raise VoxcError(f"CUDA graph {what} failed: {lib.cudaGetErrorString(code).decode()}")


def _addresses(args: list) -> list[int]:
    """The device address of every tensor of ``args``, those of a list (a per-layer cache) each."""
    return [t.data_ptr() for arg in args for t in (arg if isinstance(arg, list) else [arg])]


class CapturedStep:
    """``fn(*args, *params)`` captured once; :meth:`replay` re-runs it and returns the outputs of the
    capture (the same tensors, holding the new results).  ``args`` are device tensors: the step's
    inputs (refilled by the caller before each replay) and its state; a list of tensors (a per-layer
    cache) is passed as a tuple."""

    def __init__(self, runtime, fn, args: list, params: list):
        import tvm_ffi

        self.lib = lib = _cudart()
        self.args = args
        self._ptrs = _addresses(args)
        self.stream = ctypes.c_void_p()
        _check(lib, lib.cudaStreamCreateWithFlags(ctypes.byref(self.stream), _STREAM_NON_BLOCKING), "stream")
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        try:
            with tvm_ffi.use_raw_stream(runtime.device, self.stream.value or 0):
                fn(*args, *params)          # warm-up: the pool holds every buffer the step needs
                _check(lib, lib.cudaStreamSynchronize(self.stream), "warm-up")
                _check(lib, lib.cudaStreamBeginCapture(self.stream, _CAPTURE_MODE_RELAXED), "capture")
                try:
                    self.outputs = fn(*args, *params)
                finally:
                    code = lib.cudaStreamEndCapture(self.stream, ctypes.byref(self.graph))
                _check(lib, code, "capture")
                _check(lib, lib.cudaGraphInstantiate(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0)),
                       "instantiation")
        except (RuntimeError, VoxcError) as exc:
            # e.g. TVM's memory pool needing a fresh cudaMalloc inside the capture (seen on an H100
            # when a server's very first step was a lone stream): the caller runs the step uncaptured
            if self.graph:                  # captured, not instantiated
                lib.cudaGraphDestroy(self.graph)
            lib.cudaStreamDestroy(self.stream)
            raise VoxcError(f"CUDA graph capture failed: {str(exc).splitlines()[0][:300]}") from exc

    def matches(self, args: list) -> bool:
        """Whether ``args`` are the tensors the graph was captured with (same addresses)."""
        return _addresses(args) == self._ptrs

    def replay(self):
        # work queued on the default stream (an encode writing the audio ring) finishes first
        _check(self.lib, self.lib.cudaStreamSynchronize(None), "wait")
        _check(self.lib, self.lib.cudaGraphLaunch(self.exec, self.stream), "launch")
        _check(self.lib, self.lib.cudaStreamSynchronize(self.stream), "replay")
        return self.outputs

    def close(self) -> None:
        if self.exec:
            self.lib.cudaGraphExecDestroy(self.exec)
            self.lib.cudaGraphDestroy(self.graph)
            self.lib.cudaStreamDestroy(self.stream)
            self.exec = ctypes.c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
