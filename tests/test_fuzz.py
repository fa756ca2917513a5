"""Fuzzing the readers of untrusted files, as the GGUF and safetensors projects fuzz their parsers.

Every mutated input must either load correctly or end in a VoxcError with a one-line message
(the checkpoint mismatch report, a list by design, excepted); never another exception, a crash,
a hang, or a wrong result:

* GGUF (``voxc.loader.gguf.read_gguf``): byte flips, truncations, inserted/deleted bytes, and
  header fields (tensor and key counts, string lengths, value types, dims, tensor types and
  offsets) set to edge values in voxc GGUFs of the tiny model; JSON mutations of its voxc.config;
  other architecture names (so the community layouts' readers see it).  A successful read must
  give every tensor in the shape the config needs, and all of them must dequantize.
* safetensors checkpoints (``load_checkpoint``): the same byte mutations and JSON-level mutations
  of the safetensors header, params.json and tekken.json; a successful load must read every
  tensor in its recorded shape.  (tekken.json is parsed by voxc.tokenizer, fuzzed on its own in
  ``test_fuzz_tekken_json``, an expected failure until that module handles what it finds.)
* artifacts (``voxc.load(copy, verify="auto")`` and a short transcription): JSON mutations of
  voxc-artifact.json and tensor-cache.json (the latter also "resealed": its size and SHA-256
  written back into the manifest, as a buggy writer would), byte mutations of every file, deleted
  files.  The transcript must be the original's, or the load must raise VoxcError.  The one
  exception: a manifest whose only change is a different valid ``left_pad_tokens`` or
  ``default_delay_ms`` loads those settings, and its transcript must then equal the original
  model's with the same settings (the manifest carries no checksum of itself).  Loads run in a
  worker process, so a crash in native code fails the test instead of killing it.
* audio (``voxc.audio.load_audio``): byte mutations of WAV (header fields included) and FLAC files,
  plus odd inputs; a successful read must be finite float32 mono samples.

Hypothesis runs derandomized with a fixed number of examples (3,400 inputs, under a minute on 2 cores);
``bench/fuzz.py`` drives the same generators and checks for longer and records the count.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from voxc.errors import VoxcError  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HANG_SECONDS = 30          # one input taking longer than this is a hang
FUZZ_AUDIO_SECONDS = 0.5   # audio transcribed by every artifact case


class Finding(AssertionError):
    """A crash, hang or wrong result found by fuzzing (the message says which input).  ``signature``
    names the kind of failure, to group repeats of one bug."""

    def __init__(self, message: str, signature: str | None = None):
        super().__init__(message)
        self.signature = signature or message.split(": ")[-1][:120]


class _Hang(BaseException):
    pass


# ---- outcomes -------------------------------------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise a Finding if the block runs longer than ``seconds`` (main thread only, else unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hang:
        raise Finding(f"hang: no result after {seconds} s", "hang") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_message(message: str, what: str) -> None:
    """A VoxcError message: non-empty, one line (the checkpoint report is a list by design)."""
    if not message.strip():
        raise Finding(f"{what}: VoxcError with an empty message")
    if "Traceback (most recent call last)" in message:
        raise Finding(f"{what}: VoxcError carries a traceback: {message!r}")
    if "\n" in message and "does not match its config:\n" not in message:
        raise Finding(f"{what}: VoxcError message is not one line: {message!r}")


def outcome(fn, what: str):
    """``("ok", fn())`` or ``("error", message)`` for a VoxcError; anything else is a Finding."""
    try:
        with time_limit(HANG_SECONDS):
            return "ok", fn()
    except VoxcError as exc:
        check_message(str(exc), what)
        return "error", str(exc)
    except Finding as exc:
        if exc.signature == "hang":
            raise Finding(f"{what}: {exc}", "hang") from None
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:   # noqa: BLE001 - everything else is what the fuzzer looks for
        raise Finding(f"{what}: {type(exc).__name__} instead of VoxcError: {exc}\n"
                      f"{''.join(traceback.format_exception(exc))}", _signature(exc)) from None


def _signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in voxc's code (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/voxc/" in f.filename and "/.venv/" not in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


# ---- byte-level mutations -------------------------------------------------------------------------
# A field is (offset, size in bytes, label, original value) of a little-endian integer of a header.
_SPLATS = [b"\xff" * 8, b"\x00" * 8, b"\x00\x7e", b"\x00\x7c", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
           b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80"]   # ones, zeros, f16 NaN/inf, f32 NaN/inf, INT32 max/min


def _field_values(value: int, size: int):
    top = 1 << (8 * size)
    special = sorted({0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 4096, 65535, 1 << 31, (1 << 31) - 1, 1 << 32,
                      1 << 62, top - 1, top // 2, (value + 1), (value - 1), value * 2, value // 2,
                      value + 4096, value << 8, value ^ (1 << 63)})
    return st.one_of(st.sampled_from(special), st.integers(0, top - 1)).map(lambda v: v % top)


@st.composite
def byte_ops(draw, size: int, fields: list[tuple[int, int, str, int]], hot: int):
    """1-3 mutations of a file of ``size`` bytes whose first ``hot`` bytes are its header."""
    ops = []
    kinds = ["field"] * 4 + ["flip"] * 3 + ["truncate", "insert", "delete", "splat"] if fields else \
        ["flip"] * 4 + ["truncate", "insert", "delete", "splat"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        limit = hot if draw(st.integers(0, 3)) else size
        pos = draw(st.integers(0, max(0, limit - 1)))
        if kind == "field":
            off, n, label, value = fields[draw(st.integers(0, len(fields) - 1))]
            ops.append(("set", off, n, draw(_field_values(value, n)), label))
        elif kind == "flip":
            ops.append(("flip", pos, draw(st.integers(0, 7))))
        elif kind == "truncate":
            ops.append(("truncate", pos))
        elif kind == "insert":
            ops.append(("insert", pos, draw(st.binary(min_size=1, max_size=16))))
        elif kind == "delete":
            ops.append(("delete", pos, draw(st.integers(1, 64))))
        else:
            ops.append(("splat", pos, draw(st.one_of(st.sampled_from(_SPLATS), st.binary(min_size=1, max_size=32)))))
    return ops


def apply_byte_ops(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1]
        if kind == "set":
            _, off, n, value, _label = op
            if off + n <= len(buf):
                buf[off:off + n] = value.to_bytes(n, "little")
        elif kind == "flip":
            if pos < len(buf):
                buf[pos] ^= 1 << op[2]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos:pos + op[2]]
        elif kind == "splat":
            buf[pos:pos + len(op[2])] = op[2]
    return bytes(buf)


# ---- JSON-level mutations -------------------------------------------------------------------------
_JSON_VALUES = [None, True, False, 0, 1, -1, 2, 3, 2 ** 31 - 1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, -(2 ** 63), 1.5,
                -0.0, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "0", "1e400", "../x",
                "/etc/hostname", ".", "model.so", "tekken.json", "params_shard_0.bin", "tensor-cache.json",
                "voxc-artifact.json", "cpu", "cuda", "webgpu", "llvm", "float16", "bfloat16", "int8", "object",
                [], {}, [1, 2], [None], {"a": 1}]


def _json_paths(node, prefix=()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            paths += _json_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            paths += _json_paths(v, prefix + (i,))
    return paths


_PATHS_CACHE: dict[int, dict] = {}


def _paths_by_top(base) -> dict:
    key = id(base)
    if key not in _PATHS_CACHE:
        if isinstance(base, dict):
            _PATHS_CACHE[key] = {k: _json_paths(v, (k,)) for k, v in base.items()}
        else:
            _PATHS_CACHE[key] = {None: _json_paths(base)}
    return _PATHS_CACHE[key]


@st.composite
def json_ops(draw, base, max_ops: int = 2, focus: dict | None = None):
    """1-``max_ops`` mutations of JSON document ``base``: a top-level key is drawn first (``focus``
    repeats some keys to draw them more often), then any path below it."""
    by_top = _paths_by_top(base)
    tops = [t for t in by_top if by_top[t]] + [t for t, n in (focus or {}).items() for _ in range(n) if t in by_top]
    ops = []
    for _ in range(draw(st.integers(1, max_ops))):
        top = draw(st.sampled_from(tops))
        path = draw(st.sampled_from(by_top[top]))
        op = draw(st.sampled_from(["delete", "set", "set", "perturb", "perturb", "perturb", "add_key", "swap"]))
        if op == "set":
            arg = draw(st.one_of(st.sampled_from(_JSON_VALUES), st.integers(-(2 ** 65), 2 ** 65),
                                 st.floats(), st.text(max_size=6)))
        else:
            arg = draw(st.integers(0, 1 << 16))
        ops.append((path, op, arg))
    return ops


def _perturb(value, k: int):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2, -value, float(value), str(value), value + (1 << 32), 0][k % 8]
    if isinstance(value, float):
        return [value * (1 + 1e-6), -value, value * 1e6, int(value) if math.isfinite(value) else 0, str(value),
                float("nan")][k % 6]
    if isinstance(value, str):
        return [value + "x", value[:-1], value.upper(), "", "../" + value, value * 2, value.encode().hex()][k % 7]
    if isinstance(value, list):
        if not value:
            return [0]
        i, j = k % len(value), (k // 7) % len(value)
        return [value[::-1], value[:-1], value + value[:1], [value[0]], value[:i] + value[i + 1:],
                [*value[:i], value[j], *value[i + 1:]]][k % 6]
    if isinstance(value, dict):
        if not value:
            return {"x": 1}
        keys = list(value)
        drop = keys[k % len(keys)]
        return [{**value, "zz_unknown": 1}, {kk: v for kk, v in value.items() if kk != drop}, list(value.values()),
                {drop: value[drop]}][k % 4]
    return [0, "", [], {}][k % 4]


def apply_json_ops(doc, ops):
    doc = copy.deepcopy(doc)
    for path, op, arg in ops:
        parent, node = None, doc
        try:
            for p in path[:-1]:
                node = node[p]
            parent, key = node, path[-1]
            if not isinstance(parent, (dict, list)) or isinstance(parent, list) != isinstance(key, int):
                continue
            value = parent[key]
        except (KeyError, IndexError, TypeError):
            continue
        if op == "delete":
            del parent[key]
        elif op == "set":
            parent[key] = arg
        elif op == "perturb":
            parent[key] = _perturb(value, arg)
        elif op == "add_key":
            if isinstance(value, dict):
                value[f"extra{arg % 3}"] = [arg, str(arg)]
            else:
                parent[key] = {"value": value}
        elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
            other = arg % len(parent)
            parent[key], parent[other] = parent[other], parent[key]
        elif op == "swap" and isinstance(parent, dict) and len(parent) > 1:
            other = list(parent)[arg % len(parent)]
            parent[key], parent[other] = parent[other], parent[key]
    return doc


def dump_json(doc) -> bytes:
    return json.dumps(doc, indent=1).encode()


# ---- GGUF -----------------------------------------------------------------------------------------
def gguf_fields(data: bytes) -> tuple[list[tuple[int, int, str, int]], int]:
    """The integer fields of a GGUF v3 header (counts, lengths, types, dims, offsets) and the header's
    size, found by walking it (the tiny files are well-formed)."""
    fields = []
    pos = 0

    def take(size: int, label: str) -> int:
        nonlocal pos
        value = int.from_bytes(data[pos:pos + size], "little")
        fields.append((pos, size, label, value))
        pos += size
        return value

    def string(label: str) -> str:
        nonlocal pos
        n = take(8, f"{label} length")
        text = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return text

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos = 4
    take(4, "version")
    n_tensors = take(8, "tensor count")
    n_kv = take(8, "kv count")
    for i in range(n_kv):
        key = string(f"key {i}")
        vtype = take(4, f"{key} type")
        if vtype == 8:
            string(key)
        elif vtype == 9:
            itype = take(4, f"{key} item type")
            count = take(8, f"{key} count")
            for _ in range(count):
                if itype == 8:
                    string(f"{key} item")
                else:
                    pos += scalar[itype]
        else:
            pos += scalar[vtype]
    for i in range(n_tensors):
        name = string(f"tensor {i} name")
        n_dims = take(4, f"{name} n_dims")
        for d in range(n_dims):
            take(8, f"{name} dim {d}")
        take(4, f"{name} type")
        take(8, f"{name} offset")
    return fields, pos


def make_gguf(directory: Path, qtype: str) -> Path:
    from voxc.loader.safetensors_loader import load_checkpoint
    from voxc.loader.tiny import make_tiny
    from voxc.quant.cli import LazyTensors
    from voxc.quant.gguf_writer import write_voxc_gguf

    ckpt_dir = directory / "ckpt"
    if not ckpt_dir.exists():
        make_tiny(ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir, progress=False)
    out = directory / f"tiny-{qtype}.gguf"
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        write_voxc_gguf(LazyTensors(ckpt), ckpt.config, ckpt.tokenizer_path.read_bytes(), out, qtype)
    return out


def check_gguf(path: Path, what: str):
    from voxc.loader.gguf import read_gguf
    from voxc.loader.names import expected_shapes
    from voxc.quant.formats import QuantTensor

    def read():
        cfg, tensors, meta = read_gguf(path)
        want = expected_shapes(cfg)
        count = 0
        for name, value in tensors:
            with np.errstate(all="ignore"):   # damaged scales dequantize to inf/NaN: a value, not an error
                array = value.dequantize() if isinstance(value, QuantTensor) else np.asarray(value)
            if tuple(array.shape) != tuple(want[name]):
                raise Finding(f"{what}: {name} read as shape {array.shape}, the config needs {want[name]}")
            count += 1
        if count != len(want):
            raise Finding(f"{what}: read {count} tensors, the config has {len(want)}")
        if not isinstance(meta["tokenizer_json"], (bytes, type(None))):
            raise Finding(f"{what}: tokenizer_json is {type(meta['tokenizer_json']).__name__}")
        return count

    return outcome(read, what)


class Corpus:
    """Valid inputs of one kind, a hypothesis strategy of mutations (``cases``), and ``check``."""
    count: int
    outcomes: collections.Counter

    def _tally(self, result: str) -> str:
        self.outcomes[result] += 1
        return result


def replace_gguf_string(data: bytes, fields, header_end: int, key: str, value: bytes) -> bytes:
    """``data`` with the string value of metadata ``key`` replaced (any length): the header is
    re-laid and the tensor data keeps its alignment, so only that value differs."""
    at = next(off for off, size, label, _ in fields if label == f"{key} length")
    old = int.from_bytes(data[at:at + 8], "little")
    header = data[:at] + len(value).to_bytes(8, "little") + value + data[at + 8 + old:header_end]
    start = -(-header_end // 32) * 32                      # general.alignment: the default 32
    return header + b"\0" * (-len(header) % 32) + data[start:]


_ARCHITECTURES = ["voxtral4b", "audiocpp", "voxtral", "llama", "clip", "", "VOXC", "voxc\0"]


class GGUFCorpus(Corpus):
    """voxc GGUFs of the tiny model (Q4_K requested: Q8_0/F16/F32 tensors; Q4_0: Q4_0 tensors):
    byte mutations; the voxc.config JSON mutated and written back; other architecture names (the
    community layouts' readers then see voxc's keys and names)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.bases = {q: make_gguf(directory, q) for q in ("q4_k", "q4_0")}
        self.data = {q: p.read_bytes() for q, p in self.bases.items()}
        self.fields = {q: gguf_fields(d) for q, d in self.data.items()}
        from voxc.loader.gguf import read_gguf

        self.config = json.loads(read_gguf(self.bases["q4_k"])[2]["kv"]["voxc.config"])
        self.count = 0
        self.outcomes: collections.Counter = collections.Counter()

    def cases(self):
        qtypes = st.sampled_from(sorted(self.data))
        return st.one_of(
            qtypes.flatmap(lambda q: st.tuples(st.just(q), st.just("bytes"), byte_ops(len(self.data[q]), *self.fields[q]))),
            st.tuples(qtypes, st.just("config"), json_ops(self.config, 2)),
            st.tuples(qtypes, st.just("architecture"), st.sampled_from(_ARCHITECTURES)),
        )

    def mutate(self, qtype: str, mode: str, ops) -> bytes:
        data, (fields, header_end) = self.data[qtype], self.fields[qtype]
        if mode == "bytes":
            return apply_byte_ops(data, ops)
        if mode == "config":
            text = json.dumps(apply_json_ops(self.config, ops)).encode()
            return replace_gguf_string(data, fields, header_end, "voxc.config", text)
        return replace_gguf_string(data, fields, header_end, "general.architecture", ops.encode())

    def check(self, case) -> str:
        qtype, mode, ops = case
        path = self.dir / "case.gguf"
        path.write_bytes(self.mutate(qtype, mode, ops))
        self.count += 1
        return self._tally(check_gguf(path, f"GGUF {qtype} with {mode} mutated by {ops!r}")[0])


# ---- safetensors checkpoints ----------------------------------------------------------------------
def check_checkpoint(directory: Path, what: str):
    from voxc.loader.safetensors_loader import load_checkpoint

    def read():
        ckpt = load_checkpoint(directory, progress=False)
        count = 0
        for name, array in ckpt.tensors(progress=False):
            if tuple(array.shape) != ckpt.info(name).shape:
                raise Finding(f"{what}: {name} read as shape {array.shape}, the header says {ckpt.info(name).shape}")
            np.asarray(array, dtype=np.float32)
            count += 1
        if count != len(ckpt):
            raise Finding(f"{what}: read {count} of {len(ckpt)} tensors")
        return count

    return outcome(read, what)


def check_tokenizer(path: Path, what: str):
    """What ``voxc build`` and the runtime ask of a tekken.json."""
    from voxc.tokenizer import Tokenizer

    def read():
        tok = Tokenizer(path)
        _ = (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.n_left_pad_tokens, tok.transcription_delay_ms)
        text = tok.decode(list(range(min(tok.vocab_size, 1100))))
        decoder = tok.incremental_decoder()
        for i in range(min(tok.vocab_size, 300)):
            decoder.push(i)
        decoder.flush()
        return text

    return outcome(read, what)


def _safetensors_header(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _safetensors_with_header(header, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + payload


class CheckpointCorpus(Corpus):
    FILES = ("consolidated.safetensors", "params.json", "tekken.json")

    def __init__(self, directory: Path):
        from voxc.loader.tiny import make_tiny

        self.dir = directory
        self.base = make_tiny(directory / "base")
        self.data = {f: (self.base / f).read_bytes() for f in self.FILES}
        self.header, self.payload = _safetensors_header(self.data["consolidated.safetensors"])
        self.params = json.loads(self.data["params.json"])
        self.tekken = json.loads(self.data["tekken.json"])
        hlen = 8 + int.from_bytes(self.data["consolidated.safetensors"][:8], "little")
        self.st_fields = ([(0, 8, "header length", hlen - 8)], hlen)
        self.count = 0
        self.outcomes: collections.Counter = collections.Counter()

    def cases(self):
        st_file = self.data["consolidated.safetensors"]
        return st.one_of(
            st.tuples(st.just("consolidated.safetensors"), st.just("bytes"), byte_ops(len(st_file), *self.st_fields)),
            st.tuples(st.just("consolidated.safetensors"), st.just("json"), json_ops(self.header, 3)),
            st.tuples(st.just("params.json"), st.just("json"), json_ops(self.params, 2)),
            st.tuples(st.just("params.json"), st.just("bytes"), byte_ops(len(self.data["params.json"]), [],
                                                                        len(self.data["params.json"]))),
            st.tuples(st.just("tekken.json"), st.just("json"),
                      json_ops(self.tekken, 2, focus={"config": 6, "audio": 4, "special_tokens": 2})),
            st.tuples(st.just("tekken.json"), st.just("bytes"), byte_ops(len(self.data["tekken.json"]), [], 2000)),
        )

    def mutate(self, name: str, mode: str, ops) -> bytes:
        if mode == "bytes":
            return apply_byte_ops(self.data[name], ops)
        if name == "consolidated.safetensors":
            return _safetensors_with_header(apply_json_ops(self.header, ops), self.payload)
        return dump_json(apply_json_ops(self.params if name == "params.json" else self.tekken, ops))

    def check(self, case) -> str:
        name, mode, ops = case
        work = self.dir / "case"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for f in self.FILES:
            (work / f).write_bytes(self.mutate(name, mode, ops) if f == name else self.data[f])
        self.count += 1
        return self._tally(check_checkpoint(work, f"checkpoint with {name} mutated ({mode}) by {ops}")[0])


class TokenizerCorpus(Corpus):
    """Mutated tekken.json files opened with voxc.tokenizer.Tokenizer (as ``voxc build`` does)."""

    def __init__(self, directory: Path):
        from voxc.tokenizer import write_tiny_tekken

        self.dir = directory
        self.data = write_tiny_tekken(directory / "base.json").read_bytes()
        self.doc = json.loads(self.data)
        self.count = 0
        self.outcomes = collections.Counter()

    def cases(self):
        return st.one_of(
            st.tuples(st.just("json"), json_ops(self.doc, 2, focus={"config": 6, "audio": 4, "special_tokens": 2})),
            st.tuples(st.just("bytes"), byte_ops(len(self.data), [], 2000)))

    def check(self, case) -> str:
        mode, ops = case
        path = self.dir / "case" / "tekken.json"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(apply_byte_ops(self.data, ops) if mode == "bytes" else dump_json(apply_json_ops(self.doc, ops)))
        self.count += 1
        return self._tally(check_tokenizer(path, f"tekken.json mutated ({mode}) by {ops}")[0])


# ---- artifacts ------------------------------------------------------------------------------------
def fuzz_audio() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(int(16000 * FUZZ_AUDIO_SECONDS))).astype(np.float32)


def _worker_main(pristine: str) -> None:
    """The artifact worker: loads mutated copies and transcribes, one JSON line per request."""
    import voxc

    out = sys.stdout
    sys.stdout = sys.stderr          # anything else printed goes to stderr
    audio = fuzz_audio()
    reference = voxc.load(pristine)
    expected = {}

    def reference_text(delay_ms, left_pad):
        if (delay_ms, left_pad) not in expected:
            session = reference.stream(delay_ms, left_pad_tokens=left_pad)
            expected[delay_ms, left_pad] = session.feed(audio) + session.finish()
        return expected[delay_ms, left_pad]

    original = reference.transcribe(audio)
    out.write("@@FUZZ " + json.dumps({"ready": True, "text": original}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        model = None
        try:
            model = voxc.load(request["dir"], verify="auto")
            text = model.transcribe(audio)
            settings_ = (model.default_delay_ms, model.left_pad_tokens)
            reply = {"outcome": "ok", "text": text, "settings": settings_,
                     "expected": reference_text(*settings_)}
        except VoxcError as exc:
            reply = {"outcome": "error", "message": str(exc)}
        except BaseException as exc:   # noqa: BLE001
            reply = {"outcome": "bug", "error": "".join(traceback.format_exception(exc)), "signature": _signature(exc)}
        del model
        out.write("@@FUZZ " + json.dumps(reply) + "\n")
        out.flush()


class ArtifactWorker:
    """The worker process; a crash or hang of one load is reported, and the next request restarts it."""

    def __init__(self, pristine: Path, cache_dir: Path):
        self.pristine, self.cache_dir = pristine, cache_dir
        self.proc = None
        self.original_text = None

    def _start(self):
        env = {**os.environ, "VOXC_CACHE_DIR": str(self.cache_dir), "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--artifact-worker",
                                      str(self.pristine)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        ready = self._reply(120, "start")
        self.original_text = ready["text"]

    @staticmethod
    def _pump(proc, lines):
        for line in proc.stdout:
            if line.startswith("@@FUZZ "):
                lines.put(json.loads(line[7:]))
        lines.put(None)

    def _reply(self, timeout: float, what: str) -> dict:
        try:
            reply = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise Finding(f"{what}: hang: the worker gave no answer in {timeout} s", "hang") from None
        if reply is None:
            code = self.proc.wait()
            self.proc = None
            died = f"signal {-code}" if code < 0 else f"exit {code}"
            raise Finding(f"{what}: the worker died ({died})", f"worker died ({died})")
        return reply

    def load(self, directory: Path, what: str) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"dir": str(directory)}) + "\n")
        self.proc.stdin.flush()
        return self._reply(HANG_SECONDS * 2, what)

    def close(self):
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def build_tiny_artifact(directory: Path) -> Path:
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    ckpt = make_tiny(directory / "ckpt")
    out = directory / "artifact"
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        build(ckpt, "llvm", out, progress=False)
    return out


class ArtifactCorpus(Corpus):
    MANIFEST = "voxc-artifact.json"
    INDEX = "tensor-cache.json"

    def __init__(self, pristine: Path, work: Path):
        self.pristine, self.work = pristine, work
        work.mkdir(parents=True, exist_ok=True)
        self.manifest = json.loads((pristine / self.MANIFEST).read_text())
        self.index = json.loads((pristine / self.INDEX).read_text())
        self.files = sorted(p.name for p in pristine.iterdir())
        self.sizes = {f: (pristine / f).stat().st_size for f in self.files}
        self.worker = ArtifactWorker(pristine, work / "cache")
        self.count = 0
        self.outcomes: collections.Counter = collections.Counter()
        self._n = 0

    def cases(self):
        m, idx = self.manifest, self.index
        focus = {"streaming": 3, "state": 2, "files": 3, "config": 2, "library": 2, "tokenizer": 1, "weights": 1,
                 "device_kind": 1, "model_dtype": 1, "cpu": 1}
        return st.one_of(
            st.tuples(st.just(self.MANIFEST), st.just("json"), json_ops(m, 2, focus=focus)),
            st.tuples(st.just(self.MANIFEST), st.just("json"), json_ops(m, 1, focus=focus)),
            st.tuples(st.just(self.MANIFEST), st.just("bytes"), byte_ops(self.sizes[self.MANIFEST], [], 2000)),
            st.tuples(st.just(self.INDEX), st.just("json-resealed"), json_ops(idx, 2)),
            st.tuples(st.just(self.INDEX), st.just("json"), json_ops(idx, 1)),
            st.sampled_from([f for f in self.files if f != self.MANIFEST]).flatmap(
                lambda f: st.tuples(st.just(f), st.just("bytes"), byte_ops(self.sizes[f], [], 4096))),
            st.tuples(st.just("params_shard_0.bin"), st.just("bytes-resealed"),
                      st.one_of(st.tuples(st.just("truncate"), st.integers(0, self.sizes["params_shard_0.bin"] - 1)),
                                st.tuples(st.just("insert"), st.integers(0, self.sizes["params_shard_0.bin"]),
                                          st.binary(min_size=1, max_size=8))).map(lambda op: [op])),
            st.tuples(st.sampled_from(self.files), st.just("delete"), st.just([])),
        )

    def materialize(self, case) -> Path:
        name, mode, ops = case
        self._n += 1
        work = self.work / f"case{self._n}"
        work.mkdir()
        for f in self.files:
            os.link(self.pristine / f, work / f)   # unchanged files are hard links (one dlopen of model.so)
        target = work / name
        original = (self.pristine / name).read_bytes()
        target.unlink()                            # never write through a hard link
        if mode == "delete":
            return work
        if mode.startswith("json"):
            doc = apply_json_ops(self.manifest if name == self.MANIFEST else self.index, ops)
            data = dump_json(doc) if name == self.MANIFEST else json.dumps(doc).encode()
        else:
            data = apply_byte_ops(original, ops)
        target.write_bytes(data)
        if mode.endswith("resealed"):
            from voxc.artifact import file_record

            manifest = copy.deepcopy(self.manifest)
            manifest["files"][name] = file_record(target)
            (work / self.MANIFEST).unlink()
            (work / self.MANIFEST).write_bytes(dump_json(manifest))
        return work

    def check(self, case) -> str:
        work = self.materialize(case)
        what = f"artifact with {case[0]} mutated ({case[1]}) by {case[2]}"
        try:
            reply = self.worker.load(work, what)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.count += 1
        if reply["outcome"] == "bug":
            raise Finding(f"{what}: {reply['error']}", reply["signature"])
        if reply["outcome"] == "error":
            check_message(reply["message"], what)
            return self._tally("error")
        if reply["text"] != reply["expected"]:
            raise Finding(f"{what}: loaded without error but transcribed {reply['text']!r}, the original model "
                          f"gives {reply['expected']!r} with the same settings {reply['settings']}")
        if reply["settings"] != [self.manifest["streaming"]["default_delay_ms"],
                                 self.manifest["streaming"]["left_pad_tokens"]]:
            changed = {p[0][:2] for p in case[2]} if case[1] == "json" and case[0] == self.MANIFEST else None
            allowed = {("streaming", "default_delay_ms"), ("streaming", "left_pad_tokens")}
            if not changed or not changed <= allowed:
                raise Finding(f"{what}: loaded with settings {reply['settings']} though no setting was changed")
        return self._tally("ok")

    def close(self):
        self.worker.close()


# ---- audio ----------------------------------------------------------------------------------------
def wav_fields(data: bytes) -> tuple[list[tuple[int, int, str, int]], int]:
    """RIFF size, chunk ids and sizes and every fmt field of a WAV file."""
    fields = [(4, 4, "RIFF size", int.from_bytes(data[4:8], "little"))]
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        fields.append((pos, 4, f"{cid!r} id", int.from_bytes(cid, "little")))
        fields.append((pos + 4, 4, f"{cid!r} size", size))
        if cid == b"fmt ":
            for off, n, label in [(0, 2, "format tag"), (2, 2, "channels"), (4, 4, "sample rate"),
                                  (8, 4, "byte rate"), (12, 2, "block align"), (14, 2, "bits per sample")]:
                at = pos + 8 + off
                fields.append((at, n, label, int.from_bytes(data[at:at + n], "little")))
        if cid == b"data":
            return fields, pos + 8
        pos += 8 + size + (size & 1)
    return fields, pos


def check_audio(path, what: str):
    from voxc.audio import load_audio

    def read():
        samples = load_audio(path)
        if not (isinstance(samples, np.ndarray) and samples.dtype == np.float32 and samples.ndim == 1
                and samples.size > 0 and np.isfinite(samples).all()):
            raise Finding(f"{what}: load_audio returned {type(samples).__name__} "
                          f"{getattr(samples, 'dtype', '')} {getattr(samples, 'shape', '')}")
        return samples.size

    return outcome(read, what)


class AudioCorpus(Corpus):
    def __init__(self, directory: Path):
        import soundfile

        self.dir = directory
        rng = np.random.default_rng(1)
        mono = (0.3 * rng.standard_normal(4000)).astype(np.float32)
        stereo = (0.3 * rng.standard_normal((2205, 2))).astype(np.float32)
        self.data = {}
        for name, samples, rate, fmt, subtype in [("f32.wav", mono, 16000, "WAV", "FLOAT"),
                                                  ("s16.wav", stereo, 44100, "WAV", "PCM_16"),
                                                  ("u8.wav", mono, 8000, "WAV", "PCM_U8"),
                                                  ("s24.flac", stereo, 22050, "FLAC", "PCM_24")]:
            path = directory / name
            soundfile.write(path, samples, rate, format=fmt, subtype=subtype)
            self.data[name] = path.read_bytes()
        self.fields = {n: wav_fields(d) if n.endswith(".wav") else ([], 128) for n, d in self.data.items()}
        self.count = 0
        self.outcomes: collections.Counter = collections.Counter()

    def cases(self):
        return st.sampled_from(sorted(self.data)).flatmap(
            lambda n: st.tuples(st.just(n), byte_ops(len(self.data[n]), *self.fields[n])))

    def check(self, case) -> str:
        name, ops = case
        path = self.dir / ("case" + Path(name).suffix)
        path.write_bytes(apply_byte_ops(self.data[name], ops))
        self.count += 1
        return self._tally(check_audio(path, f"audio {name} with {ops}")[0])


# ---- the tests ------------------------------------------------------------------------------------
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def gguf_corpus(tmp_path_factory):
    return GGUFCorpus(tmp_path_factory.mktemp("fuzz_gguf"))


@pytest.fixture(scope="module")
def checkpoint_corpus(tmp_path_factory):
    return CheckpointCorpus(tmp_path_factory.mktemp("fuzz_ckpt"))


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory):
    return AudioCorpus(tmp_path_factory.mktemp("fuzz_audio"))


@pytest.fixture(scope="module")
def artifact_corpus(tmp_path_factory):
    built = build_tiny_artifact(tmp_path_factory.mktemp("fuzz_artifact_build"))
    corpus = ArtifactCorpus(built, tmp_path_factory.mktemp("fuzz_artifact_cases"))
    yield corpus
    corpus.close()


def _fuzz(corpus, examples: int):
    @settings(FUZZ, max_examples=examples)
    @given(corpus.cases())
    def run(case):
        corpus.check(case)
    run()


def test_fuzz_gguf(gguf_corpus):
    for qtype in gguf_corpus.bases:    # the unmutated files read
        assert check_gguf(gguf_corpus.bases[qtype], qtype)[0] == "ok"
    _fuzz(gguf_corpus, 1000)


def test_fuzz_checkpoint(checkpoint_corpus):
    assert check_checkpoint(checkpoint_corpus.base, "the tiny checkpoint")[0] == "ok"
    _fuzz(checkpoint_corpus, 800)


def test_fuzz_audio(audio_corpus):
    for name in audio_corpus.data:
        assert check_audio(audio_corpus.dir / name, name)[0] == "ok"
    _fuzz(audio_corpus, 1000)


@pytest.fixture(scope="module")
def tokenizer_corpus(tmp_path_factory):
    return TokenizerCorpus(tmp_path_factory.mktemp("fuzz_tokenizer"))


def test_fuzz_tekken_json(tokenizer_corpus):
    assert check_tokenizer(tokenizer_corpus.dir / "base.json", "the tiny tekken.json")[0] == "ok"

    @settings(FUZZ, max_examples=300, phases=[hypothesis.Phase.generate])   # no shrinking: a hang costs 30 s
    @given(tokenizer_corpus.cases())
    def run(case):
        tokenizer_corpus.check(case)
    run()


def test_fuzz_artifact(artifact_corpus):
    assert artifact_corpus.check((ArtifactCorpus.MANIFEST, "json", [])) == "ok"   # an unchanged copy loads
    _fuzz(artifact_corpus, 600)


def _write_wav_header(path: Path, *, channels=1, rate=16000, bits=16, tag=1, frames=0, payload=b""):
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    data = payload or bytes(frames * block)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)
    return path


def test_odd_audio_inputs(tmp_path):
    import soundfile

    from voxc.audio import load_audio

    def error(source, **kw):
        with time_limit(HANG_SECONDS), pytest.raises(VoxcError) as info:
            load_audio(source, **kw)
        check_message(str(info.value), repr(source))
        return str(info.value)

    assert "directory" in error(tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty.wav" in error(tmp_path / "empty.wav")
    assert "no audio samples" in error(_write_wav_header(tmp_path / "zero.wav", frames=0))
    nan = np.full(1600, np.nan, np.float32)
    soundfile.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    assert "NaN" in error(tmp_path / "nan.wav")
    soundfile.write(tmp_path / "inf.wav", np.full(1600, np.inf, np.float32), 16000, subtype="FLOAT")
    assert "infinite" in error(tmp_path / "inf.wav")
    for rate in (1, 100, 2 ** 31 - 1, 2 ** 32 - 1):
        path = _write_wav_header(tmp_path / f"rate{rate}.wav", rate=rate, frames=1600)
        assert check_audio(path, f"{rate} Hz WAV")[0] == "error"
    for array_rate in (0, -16000, 1, 10 ** 12, 16000.5, float("nan")):
        error(np.zeros(1600, np.float32), sample_rate=array_rate)
    eight = np.random.default_rng(0).uniform(-0.5, 0.5, (1600, 8)).astype(np.float32)
    soundfile.write(tmp_path / "eight.wav", eight, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "eight.wav"), eight.mean(axis=1), atol=1e-7)
    many = np.random.default_rng(1).uniform(-0.5, 0.5, (10, 24)).astype(np.float32)
    soundfile.write(tmp_path / "many.wav", many, 16000, subtype="FLOAT")   # 24 channels, 10 frames
    np.testing.assert_allclose(load_audio(tmp_path / "many.wav"), many.mean(axis=1), atol=1e-7)
    for bad in (None, "", object(), np.zeros((2, 3, 4)), np.array(["a", "b"]), np.zeros(0), [[1.0] * 20] * 20):
        error(bad, sample_rate=16000)


if __name__ == "__main__" and sys.argv[1:2] == ["--artifact-worker"]:
    _worker_main(sys.argv[2])
