"""On the GPU machine: the tiny model's cuda artifact against its llvm twin (same weights), through
voxc's runtime-only loader, plus the CUDA ring-attention kernels at the full model's shapes against
numpy.  Exit status 1 if any check fails.

    python bench/device/tiny_check.py          (after bench/device/setup.sh; see run_check.sh)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PACK = common.setup()
ART = PACK / "artifacts"
LOGIT_RTOL = 2e-4        # float32 on both sides; different summation orders
# float16 activations: each side rounds its own partial sums; Q4 weights are exact on both sides
TOLERANCE = {"f16": 3e-2, "q4k": 1e-3}
failures: list[str] = []


def check(report, name, ok, detail):
    report[name] = {"ok": bool(ok), **detail}
    if not ok:
        failures.append(name)


def test_audio(seconds=3.2, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    sweep = 0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) * (np.sin(2 * np.pi * 1.3 * t) > -0.2)
    return (sweep + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def run_session(model, audio, chunk=None):
    from voxc.runtime.session import StreamingSession

    s = StreamingSession(model, delay_ms=model.default_delay_ms, left_pad_tokens=model.left_pad_tokens,
                         record_logits=True)
    if chunk is None:
        s.feed(audio)
    else:
        for i in range(0, len(audio), chunk):
            s.feed(audio[i:i + chunk])
    s.finish()
    return s.tokens, np.stack(s.logits) if s.logits else np.zeros((0,))


def use_static_decode(model):
    """Route one-token, one-stream decode calls to the static ``decode_b1n1`` entry when present."""
    try:
        static = model.vm["decode_b1n1"]
    except Exception:  # noqa: BLE001
        return False
    general = model._decode

    def dispatch(tokens, *rest):
        if tuple(tokens.shape) == (1, 1):
            return static(tokens, *rest)
        return general(tokens, *rest)

    model._decode = dispatch
    try:
        static_encode = model.vm["encode_b1t8"]
        general_encode = model._encode
        model._encode = lambda mel, *rest: (static_encode if tuple(mel.shape)[0] == 1 and tuple(mel.shape)[2] == 8
                                            else general_encode)(mel, *rest)
    except Exception:  # noqa: BLE001
        pass
    return True


def compare(report, name, ref, got, rtol=LOGIT_RTOL):
    (ref_tokens, ref_logits), (tokens, logits) = ref, got
    same = ref_tokens == tokens
    err = float(np.abs(ref_logits - logits).max() / np.abs(ref_logits).max()) if same and len(tokens) else None
    check(report, name, same and err is not None and err < rtol,
          {"tokens": len(tokens), "tokens_equal": same, "logit_rel_err": err,
           "first_diff": next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)})


def batched_check(report, art):
    """Several streams per decode call (the generic entry, small-M kernels) against llvm."""
    from voxc.runtime.model import CompiledModel

    rng = np.random.default_rng(3)
    models = [CompiledModel.load(art / "tiny_llvm", max_streams=6), CompiledModel.load(art / "tiny_cuda", max_streams=6)]
    outs = [[], []]
    for step in range(6):
        b = [1, 3, 5, 6, 2, 4][step]
        tokens = rng.integers(0, 1268, (b, 1 if step % 3 else 9)).astype(np.int32)
        slots = rng.permutation(6)[:b].astype(np.int32)
        starts = rng.integers(0, 40, b).astype(np.int32)
        delays = np.full(b, 6, np.float32)
        for k, m in enumerate(models):
            logits, nxt = m.decode(tokens, delays, slots, starts)
            outs[k].append(m.rt.numpy(logits))
    ref, got = np.concatenate([o.ravel() for o in outs[0]]), np.concatenate([o.ravel() for o in outs[1]])
    err = float(np.abs(ref - got).max() / np.abs(ref).max())
    check(report, "tiny_cuda_batched_decode", err < LOGIT_RTOL, {"logit_rel_err": err, "batches": [1, 3, 5, 6, 2, 4]})


# ---- ring attention at full shapes ----------------------------------------------------------------
def attention_reference(q, k, v, cache, slots, starts, layer, window):
    b, n, heads, d = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for bi in range(b):
        s = int(starts[bi])
        for i in range(n):
            lo = max(0, s + i - window + 1)
            pos = np.arange(lo, s + i + 1)
            ring = pos < s
            for h in range(heads):
                kh = h // group
                keys = np.where(ring[:, None], cache[layer, 0, slots[bi], pos % window, kh],
                                k[bi, np.clip(pos - s, 0, n - 1), kh])
                vals = np.where(ring[:, None], cache[layer, 1, slots[bi], pos % window, kh],
                                v[bi, np.clip(pos - s, 0, n - 1), kh])
                scores = keys.astype(np.float64) @ q[bi, i, h].astype(np.float64) * d ** -0.5
                w = np.exp(scores - scores.max())
                out[bi, i, h] = (w / w.sum()) @ vals
    return out


def attention_checks(report, rt):
    path = ART / "attn_cuda.so"
    if not path.exists():
        report["attention"] = "skipped (no attn_cuda.so)"
        return
    vm = rt.load_vm(path)
    rng = np.random.default_rng(7)
    cases = [  # name, heads, kv, d, window, layers, n, starts
        ("dec", 32, 8, 128, 8192, 3, 1, [0, 5, 700, 8191, 8192, 20000]),
        ("dec", 32, 8, 128, 8192, 3, 7, [0, 3, 9000]),
        ("enc", 32, 32, 64, 750, 2, 128, [700, 5000]),
        ("enc", 32, 32, 64, 750, 2, 4, [0, 1, 749, 1234]),
    ]
    for name, heads, kv, d, window, layers, n, starts in cases:
        b = len(starts)
        slots_n = b + 1
        q = rng.standard_normal((b, n, heads, d), dtype=np.float32)
        k = rng.standard_normal((b, n, kv, d), dtype=np.float32)
        v = rng.standard_normal((b, n, kv, d), dtype=np.float32)
        cache = rng.standard_normal((layers, 2, slots_n, window, kv, d), dtype=np.float32)
        slots = rng.permutation(slots_n)[:b].astype(np.int32)
        starts = np.array(starts, np.int32)
        got = rt.numpy(vm[name](rt.tensor(q), rt.tensor(k), rt.tensor(v), rt.tensor(cache), rt.tensor(slots),
                                rt.tensor(starts)))
        ref = attention_reference(q, k, v, cache, slots, starts, layers - 1, window)
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        check(report, f"attention_{name}_n{n}", err < 1e-4 and np.isfinite(got).all(),
              {"rel_err": err, "b": b, "starts": starts.tolist()})


def main():
    from voxc.errors import VoxcError
    from voxc.runtime.model import CompiledModel

    report = common.Report("tiny_check")
    report["gpu"] = common.gpu_name()
    import tvm_ffi
    report["tvm_ffi"] = tvm_ffi.__version__
    import tvm  # the shim, or the real compiler if it were installed
    report["tvm_compiler_importable"] = "no (runtime only)" if getattr(tvm, "__voxc_shim__", False) else "yes"
    audio = test_audio()
    t = time.perf_counter()
    llvm = CompiledModel.load(ART / "tiny_llvm")
    ref = run_session(llvm, audio)
    report["llvm"] = {"tokens": ref[0][:40], "n": len(ref[0]), "seconds": round(time.perf_counter() - t, 2)}
    references = {"": ref}
    for variant in sorted(p.name for p in ART.glob("tiny_cuda*")):
        # tiny_cuda[_graph] against tiny_llvm; tiny_cuda_<kind> against tiny_llvm_<kind> (q4k, f16: the
        # same quantized weights / dtype on both sides)
        kind = variant.removeprefix("tiny_cuda").removeprefix("_graph")
        if kind not in references:
            if not (ART / f"tiny_llvm{kind}").exists():
                continue
            references[kind] = run_session(CompiledModel.load(ART / f"tiny_llvm{kind}"), audio)
        ref = references[kind]
        rtol = TOLERANCE.get(kind.lstrip("_"), LOGIT_RTOL)
        t = time.perf_counter()
        try:
            model = CompiledModel.load(ART / variant, max_streams=2)
        except VoxcError as exc:
            check(report, f"{variant}_load", False, {"error": str(exc)})
            continue
        report[f"{variant}_load_s"] = round(time.perf_counter() - t, 2)
        compare(report, f"{variant}_offline", ref, run_session(model, audio), rtol)
        compare(report, f"{variant}_streaming_0.3s", ref, run_session(model, audio, chunk=4800), rtol)
        if use_static_decode(model):
            compare(report, f"{variant}_static_decode_b1n1", ref, run_session(model, audio), rtol)
            compare(report, f"{variant}_static_decode_b1n1_again", ref, run_session(model, audio, chunk=1280), rtol)
    batched_check(report, ART)
    try:
        attention_checks(report, llvm.rt.__class__("cuda"))
    except Exception as exc:  # noqa: BLE001
        check(report, "attention", False, {"error": repr(exc)[:500]})
    report["failures"] = failures
    report.save()
    print("TINY CHECK", "FAILED: " + ", ".join(failures) if failures else "PASSED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
