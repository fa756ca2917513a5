"""On the GPU machine: the tiny model's cuda and vulkan artifacts against their llvm twins (same
weights), through voxc's runtime-only loader, plus the CUDA ring-attention kernels at the full model's
shapes against numpy.  Exit status 1 if any check fails.

    python bench/device/tiny_check.py            (after bench/device/setup.sh; see run_bench.sh)
    python bench/device/tiny_check.py --local    (no GPU: after `pack.sh --local`, see below)

``--local`` runs the same comparisons on the CPU with TVM's compiler hidden: every ``tiny_llvm*``
artifact through its static one-stream entries (decode_b1n1, encode_b1t8) against the same
artifact through its generic entries, and the llvm ring-attention library of small shapes
(``attn_llvm.so``) against numpy; a ``tiny_vulkan*`` artifact against its llvm twin as on the GPU
machine (on lavapipe, Mesa's CPU Vulkan driver).  Results go to $OUT/tiny_check.json.

The vulkan pairs run last: a fault in a Vulkan driver ends the process, and the cuda and attention
results are saved by then.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# the float64 ring-attention reference lives once, with the tests (bench/device/pack.sh ships it)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from references import paged_ring, ring_attention_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LOGIT_RTOL = 2e-4        # float32 on both sides; different summation orders
# float16 activations: each side rounds its own partial sums; Q4 weights are exact on both sides
TOLERANCE = {"f16": 3e-2, "q4k": 1e-3}


def tolerance(kind: str) -> float:
    """Relative logit tolerance of a variant (tiny_cuda_<kind>): float16 anywhere in it sets it."""
    kind = kind.lstrip("_")
    return TOLERANCE["f16"] if "f16" in kind else TOLERANCE.get(kind, LOGIT_RTOL)
ATTENTION_RTOL = 1e-4
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


def run_session(model, audio, chunk=None, static=True):
    """Tokens and logits of one stream; ``static``: one-stream steps through the static entries."""
    from voxc.runtime.session import StreamingSession

    model.use_static_entries(static)
    s = StreamingSession(model, delay_ms=model.default_delay_ms, left_pad_tokens=model.left_pad_tokens,
                         record_logits=True)
    if chunk is None:
        s.feed(audio)
    else:
        for i in range(0, len(audio), chunk):
            s.feed(audio[i:i + chunk])
    s.finish()
    model.use_static_entries(True)
    return s.tokens, np.stack(s.logits) if s.logits else np.zeros((0,))


def has_static_entries(model) -> bool:
    from voxc.artifact import STATIC_ENTRIES

    return any(name in STATIC_ENTRIES for name in model.functions)


def compare(report, name, ref, got, rtol=LOGIT_RTOL):
    (ref_tokens, ref_logits), (tokens, logits) = ref, got
    same = ref_tokens == tokens
    err = float(np.abs(ref_logits - logits).max() / np.abs(ref_logits).max()) if same and len(tokens) else None
    check(report, name, same and err is not None and err < rtol,
          {"tokens": len(tokens), "tokens_equal": same, "logit_rel_err": err,
           "first_diff": next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)})


def batched_check(report, name, ref_dir: Path, got_dir: Path, rtol=LOGIT_RTOL):
    """Several streams per decode call (the generic entry, small-M kernels) against the reference."""
    import voxc

    rng = np.random.default_rng(3)
    models = [voxc.load(ref_dir, max_streams=6), voxc.load(got_dir, max_streams=6)]
    vocab = models[0].config.decoder.vocab_size
    for m in models:                  # each slot its own delay: a batch's rows read different scales
        m.set_delay(np.arange(6), [1, 3, 6, 9, 15, 30])
    outs = [[], []]
    batches = [1, 3, 5, 6, 2, 4]      # with 9 tokens at every third step: 9, 3, 5, 54, 2, 4 rows
    for step, b in enumerate(batches):
        tokens = rng.integers(0, vocab, (b, 1 if step % 3 else 9)).astype(np.int32)
        slots = rng.permutation(6)[:b].astype(np.int32)
        starts = rng.integers(0, 40, b).astype(np.int32)
        for k, m in enumerate(models):
            logits, _ = m.decode(tokens, slots, starts)
            outs[k].append(m.rt.numpy(logits))
    ref, got = np.concatenate([o.ravel() for o in outs[0]]), np.concatenate([o.ravel() for o in outs[1]])
    err = float(np.abs(ref - got).max() / np.abs(ref).max())
    check(report, name, err < rtol, {"logit_rel_err": err, "batches": batches})


# ---- ring attention --------------------------------------------------------------------------------
def attention_cases(case: dict) -> list[tuple[int, list[int]]]:
    """(chunk length n, starts) to test for one library function: one-token steps across the ring's
    wrap, a short chunk, and a chunk longer than the decoder step (the encoder's); and a decode step of
    72 sequences, which fills the GPU with one split of keys per query (schedules/ring_attention.py:
    active_splits) where the smaller batches split them."""
    w = case["window"]
    if case["name"] == "dec":
        many = [(37 * i) % min(w, 1200) for i in range(70)] + [w - 1, w + 5]   # few pages each: a small host reference
        return [(1, [0, 5, w // 11, w - 1, w, 2 * w + w // 2]), (7, [0, 3, w + w // 10]), (1, many)]
    return [(min(128, max(4, w // 2)), [w - 50 if w > 50 else 1, 6 * w + 500 % w]), (4, [0, 1, w - 1, w + w // 2])]


def attention_checks(report, library: Path, device: str):
    from voxc.runtime.tvm_runtime import Runtime

    if not library.exists():
        report["attention"] = f"skipped (no {library.name})"
        return
    cases = json.loads(library.with_suffix(".json").read_text())["cases"]
    rt = Runtime(device)
    vm = rt.load_vm(library)
    rng = np.random.default_rng(7)
    for case in cases:
        name, heads, kv, d, window, page_rows = (case[k] for k in ("name", "heads", "kv_heads", "head_dim", "window",
                                                                   "page_rows"))
        for n, starts in attention_cases(case):
            b = len(starts)
            q = rng.standard_normal((b, n, heads, d), dtype=np.float32)
            k = rng.standard_normal((b, n, kv, d), dtype=np.float32)
            v = rng.standard_normal((b, n, kv, d), dtype=np.float32)
            cache, pages = paged_ring(rng, starts, n, window, page_rows, kv, d, np.float32)
            starts = np.array(starts, np.int32)
            got = rt.numpy(vm[name](rt.tensor(q), rt.tensor(k), rt.tensor(v), rt.tensor(cache), rt.tensor(pages),
                                    rt.tensor(starts)))
            ref = ring_attention_reference(q, k, v, cache, pages, starts, window)[0]
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            check(report, f"attention_{name}_n{n}" + (f"_b{b}" if b > 8 else ""), err < ATTENTION_RTOL and np.isfinite(got).all(),
                  {"rel_err": err, "b": b, "starts": starts.tolist()})


# ---- the two modes ------------------------------------------------------------------------------------
def device_pairs(art: Path):
    """(variant, reference, tolerance): tiny_cuda[_graph] against tiny_llvm; tiny_cuda_<kind> against
    tiny_llvm_<kind> (q4k, f16: the same quantized weights / dtype on both sides)."""
    for variant in sorted(p.name for p in art.glob("tiny_cuda*")):
        kind = variant.removeprefix("tiny_cuda").removeprefix("_graph")
        if (art / f"tiny_llvm{kind}").exists():
            yield variant, f"tiny_llvm{kind}", tolerance(kind)


def vulkan_pairs(art: Path):
    """(variant, reference, tolerance): tiny_vulkan<kind> against its own twin tiny_llvm_vulkan<kind>
    (pack.sh names them so, beside the cuda variants' twins)."""
    for variant in sorted(p.name for p in art.glob("tiny_vulkan*")):
        kind = variant.removeprefix("tiny_vulkan")
        if (art / f"tiny_llvm_vulkan{kind}").exists():
            yield variant, f"tiny_llvm_vulkan{kind}", tolerance(kind)


def local_pairs(art: Path):
    """Every tiny llvm artifact against itself: static entries against the generic ones."""
    for variant in sorted(p.name for p in art.glob("tiny_llvm*")):
        kind = variant.removeprefix("tiny_llvm")
        yield variant, variant, tolerance(kind)


def check_pairs(report, art: Path, pairs, audio, references: dict, local: bool) -> None:
    """Each (variant, reference, tolerance): offline, streamed, static entries and batched decode; an
    error in one variant is its failure, not the end of the others."""
    import voxc

    for variant, reference, rtol in pairs:
        try:
            if reference not in references:
                t = time.perf_counter()
                references[reference] = run_session(voxc.load(art / reference), audio, static=False)
                report[f"{reference}_reference"] = {"tokens": references[reference][0][:40],
                                                    "n": len(references[reference][0]),
                                                    "seconds": round(time.perf_counter() - t, 2)}
            check_variant(report, art, variant, reference, rtol, audio, references[reference], local)
        except Exception as exc:  # noqa: BLE001 - a missing Vulkan loader or adapter lands here, in one line
            check(report, f"{variant}_error", False, {"error": " ".join(str(exc).split())[:500] or repr(exc)})


def check_variant(report, art: Path, variant: str, reference: str, rtol: float, audio, ref, local: bool) -> None:
    import voxc

    t = time.perf_counter()
    model = voxc.load(art / variant, max_streams=2)
    report[f"{variant}_load_s"] = round(time.perf_counter() - t, 2)
    compare(report, f"{variant}_offline", ref, run_session(model, audio, static=False), rtol)
    compare(report, f"{variant}_streaming_0.3s", ref, run_session(model, audio, chunk=4800, static=False), rtol)
    if has_static_entries(model):
        compare(report, f"{variant}_static_entries", ref, run_session(model, audio), rtol)
        compare(report, f"{variant}_static_entries_80ms", ref, run_session(model, audio, chunk=1280), rtol)
    elif local and variant.startswith("tiny_llvm"):
        check(report, f"{variant}_static_entries", False, {"error": f"no static entries in {model.functions}"})
    else:   # (vulkan) the 80 ms steps of a live stream go through the generic entries
        compare(report, f"{variant}_streaming_80ms", ref, run_session(model, audio, chunk=1280, static=False), rtol)
    del model
    # several streams per call: the generic entry's row dispatch (1, 2, <=4, <=32 rows: GEMVs; more: GEMM)
    batched_check(report, f"{variant}_batched_decode", art / reference, art / variant, rtol)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", action="store_true", help="no GPU: llvm static vs generic entries, CPU attention")
    args = ap.parse_args(argv)
    pack = common.setup()
    art = pack / "artifacts"

    report = common.Report("tiny_check")
    report["mode"] = "local (cpu)" if args.local else "device (cuda)"
    report["gpu"] = "none (local)" if args.local else common.gpu_name()
    import tvm_ffi
    report["tvm_ffi"] = tvm_ffi.__version__
    report["tvm_compiler_importable"] = common.tvm_compiler_importable()
    audio = test_audio()
    references = {}
    pairs = list(local_pairs(art) if args.local else device_pairs(art))
    if not pairs:
        check(report, "artifacts", False, {"error": f"no tiny artifacts to compare in {art}"})
    check_pairs(report, art, pairs, audio, references, args.local)
    library, device = (art / "attn_llvm.so", "cpu") if args.local else (art / "attn_cuda.so", "cuda")
    try:
        attention_checks(report, library, device)
    except Exception as exc:  # noqa: BLE001
        check(report, "attention", False, {"error": repr(exc)[:500]})
    check_pairs(report, art, list(vulkan_pairs(art)), audio, references, args.local)
    report["failures"] = failures
    report.save()
    print("TINY CHECK", "FAILED: " + ", ".join(failures) if failures else "PASSED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
