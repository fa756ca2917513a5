"""Long fuzzing run: the generators and checks of tests/test_fuzz.py, many more inputs.

    python bench/fuzz.py --seconds 300            # round-robin over all targets for 5 minutes
    python bench/fuzz.py --examples 2000 --targets gguf,audio
    python bench/fuzz.py --seconds 300 --record   # and write bench/results/summary.json

Each input must load correctly or end in a one-line VoxcError (see tests/test_fuzz.py).  Prints the
number of inputs tried per target and every distinct failure with an input that shows it; exits 1
if there was any.  ``--record`` (only after a run without failures) sets ``fuzz_inputs_no_crash``
in bench/results/summary.json, keeping its other keys.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import test_fuzz as fz  # noqa: E402

SUMMARY = HERE / "results" / "summary.json"
TARGETS = ("gguf", "checkpoint", "audio", "artifact")
# opt-in: voxc/tokenizer.py still lets mistral-common's exceptions (and a hang) through, see tests/test_fuzz.py
EXTRA_TARGETS = ("tokenizer",)
BATCH = {"gguf": 100, "checkpoint": 100, "audio": 300, "artifact": 40, "tokenizer": 100}   # inputs per round


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_corpus(name: str, work: Path):
    if name == "gguf":
        return fz.GGUFCorpus(work)
    if name == "checkpoint":
        return fz.CheckpointCorpus(work)
    if name == "audio":
        return fz.AudioCorpus(work)
    if name == "tokenizer":
        return fz.TokenizerCorpus(work)
    print("building the tiny llvm artifact ...", file=sys.stderr)
    built = fz.build_tiny_artifact(work / "build")
    return fz.ArtifactCorpus(built, work / "cases")


def run_batch(corpus, examples: int, rng_seed: int, failures: dict) -> None:
    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(corpus.cases())
    def run(case):
        try:
            corpus.check(case)
        except fz.Finding as exc:
            key = exc.signature
            failures.setdefault(key, (str(exc)[:4000], 0))
            failures[key] = (failures[key][0], failures[key][1] + 1)

    run()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, help="stop starting new batches after this many seconds")
    ap.add_argument("--examples", type=int, help="inputs per target (instead of --seconds)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated, of {', '.join(TARGETS + EXTRA_TARGETS)} (default: all but tokenizer)")
    ap.add_argument("--seed", type=int, default=None, help="first random seed (default: random)")
    ap.add_argument("--record", action="store_true", help="write the count to bench/results/summary.json")
    args = ap.parse_args(argv)
    if (args.seconds is None) == (args.examples is None):
        ap.error("give exactly one of --seconds and --examples")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS + EXTRA_TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}")

    rng = random.Random(args.seed)
    failures: dict[str, tuple[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="voxc-fuzz-") as tmp:
        os.environ["VOXC_CACHE_DIR"] = str(Path(tmp) / "cache")
        corpora = {}
        for name in targets:
            (Path(tmp) / name).mkdir()
            corpora[name] = make_corpus(name, Path(tmp) / name)
        start = time.monotonic()
        try:
            if args.examples is not None:
                for name, corpus in corpora.items():
                    while corpus.count < args.examples:
                        run_batch(corpus, min(BATCH[name], args.examples - corpus.count), rng.getrandbits(64), failures)
            else:
                while time.monotonic() - start < args.seconds:
                    for name, corpus in corpora.items():
                        if time.monotonic() - start >= args.seconds:
                            break
                        run_batch(corpus, BATCH[name], rng.getrandbits(64), failures)
                        print(f"[{time.monotonic() - start:7.1f}s] " + ", ".join(
                            f"{n} {c.count}" for n, c in corpora.items()) + f"; {len(failures)} distinct failures",
                            file=sys.stderr, flush=True)
        finally:
            if "artifact" in corpora:
                corpora["artifact"].close()
        elapsed = time.monotonic() - start

    total = sum(c.count for c in corpora.values())
    print(f"{total} inputs in {elapsed:.0f} s: " + ", ".join(
        f"{n} {c.count} ({c.outcomes['ok']} loaded, {c.outcomes['error']} VoxcError)" for n, c in corpora.items()))
    if failures:
        print(f"{len(failures)} distinct failures:")
        for key, (message, times) in failures.items():
            print(f"--- {times}x: {key}\n{message}\n")
        return 1
    print("no crash, hang, wrong result or non-VoxcError exception")
    if args.record:
        summary = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
        command = "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:])
        summary["fuzz_inputs_no_crash"] = {"value": total, "date": datetime.date.today().isoformat(),
                                           "device": f"{cpu_model()}, {os.cpu_count()} cores", "command": command}
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"recorded fuzz_inputs_no_crash = {total} in {SUMMARY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
