"""The peer baseline on the same GPU: transformers' VoxtralRealtimeForConditionalGeneration, full-size
config, bf16, with voxc's random weights when an artifact with weights is given (else its own seeded
init). Offline generate of a SECS-second clip at each of BATCHES; the recipe of
../shared/research/probes/hf_gpu_baseline.py; then (HF_COMPILED=1, the default on a GPU) the same with
a static cache and each of COMPILED_CONFIGS (the static cache alone, transformers' own compiled generate,
torch.compile with and without CUDA graphs; HF_CONFIGS picks some), and ``fastest``: the quickest
configuration per batch, the one voxc is compared with, and ``best_aggregate``: the batch and configuration
with the most streams' worth of real time.  BATCHES: the batch sizes (default 1,16,64,128,256: its step
hardly grows with the batch, so its aggregate keeps rising with it; a batch that fails, e.g. out of
memory, is recorded as ``batch<n>_error`` and the others still run).
Writes $OUT/hf_baseline.json.

    python bench/cuda_hf_baseline.py [ARTIFACT_WITH_WEIGHTS]
    python bench/cuda_hf_baseline.py --local ARTIFACT   # a rehearsal on the CPU: the artifact's (tiny) config
                                                        # and weights, float32, a 2 s clip, batches 1 and 2
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
import common  # noqa: E402

LOCAL_ENV = {"SECS": "2", "BATCHES": "1,2"}


def load_voxc_weights(model, artifact_dir: Path, cfg_dict: dict) -> int:
    """Copy an artifact's (voxc-named, official RoPE order) tensors into the HF model, as tests/oracle.py."""
    import torch

    common.setup(block_compiler=False)
    from voxc import artifact
    from voxc.config import ModelConfig
    from voxc.loader import hf
    from voxc.loader.names import rope_rows, unstack

    cfg = ModelConfig.from_dict(cfg_dict)
    manifest = artifact.read_manifest(artifact_dir)
    state = model.state_dict()
    done = 0
    with torch.no_grad():
        for name, array in artifact.read_weights(artifact_dir, manifest):
            if name == artifact.MEL_FILTERS:
                continue
            for part, rows in unstack(name, array, cfg):   # a stacked q/k/v or w1/w3 as its projections
                heads = rope_rows(part, cfg)
                if heads is not None:
                    rows = hf.interleaved_to_split_half(rows, heads)
                target = state[hf.voxc_to_hf(part, in_memory=True)]
                target.copy_(torch.from_numpy(np.array(rows)).to(target.device, target.dtype))
                done += 1
    return done


def has_weights(artifact_dir: Path) -> bool:
    """The artifact holds weights: its own, or random ones bench/cuda_build.py:ensure_weights wrote."""
    manifest = json.loads((artifact_dir / "voxc-artifact.json").read_text())
    return bool(manifest.get("weights_included") or "weights_random_seed" in manifest)


# transformers' faster decoding settings, tried in turn, each with a static KV cache.  Until the
# twelfth run (bench/RESULTS.md) every compiled one failed alike with "accessing tensor output of
# CUDAGraphs that has been overwritten": with a static cache generate compiled the forward itself, with
# CUDA graphs, under each of them.
# (tag, module whose forward torch.compile wraps ("" the whole model, None no torch.compile), mode);
# every one runs generate with a static cache.  "generate_compiled" is transformers' own fast path: with
# a static cache generate compiles the forward itself (its CompileConfig: inductor with CUDA graphs).
# The others turn that off (generation_config.disable_compile) and compile as said, so two compilations
# never stack; the CUDA-graph ones mark a new step before each call (torch.compiler.cudagraph_mark_step_begin),
# without which the graphs' outputs of one call are overwritten while generate still reads them.
COMPILED_CONFIGS = (("static", None, None), ("generate_compiled", None, None), ("inductor", "", "default"),
                    ("graphs", "", "reduce-overhead"), ("graphs_lm", "model.language_model", "reduce-overhead"))


def compiled_runs(model, run, batches, secs: float, report, torch) -> None:
    """Each of COMPILED_CONFIGS (HF_CONFIGS: a comma list of their tags, all by default): figures
    ``compiled_<tag>_batch<b>`` or ``compiled_<tag>_error``."""
    chosen = os.environ.get("HF_CONFIGS")
    tags = [c[0] for c in COMPILED_CONFIGS]
    if chosen and not set(chosen.split(",")) <= set(tags):
        raise SystemExit(f"HF_CONFIGS: {chosen!r} names a configuration outside {', '.join(tags)}")
    gen = model.generation_config
    gen.cache_implementation = "static"
    for tag, attribute, mode in COMPILED_CONFIGS:
        if chosen and tag not in chosen.split(","):
            continue
        target = model
        for name in attribute.split(".") if attribute else ():
            target = getattr(target, name, None)
        if target is None:
            report[f"compiled_{tag}_error"] = f"the model has no {attribute}"
            continue
        original = target.forward
        gen.disable_compile = tag != "generate_compiled"
        try:
            torch._dynamo.reset()
            if attribute is not None:
                compiled = torch.compile(original, mode=mode, fullgraph=False)
                if mode == "reduce-overhead":
                    def forward(*args, _compiled=compiled, **kwargs):
                        torch.compiler.cudagraph_mark_step_begin()
                        return _compiled(*args, **kwargs)
                    target.forward = forward
                else:
                    target.forward = compiled
            t = time.perf_counter()
            for b in batches:
                run(b, 40)      # compiles (and captures) for this batch's shapes, outside the timing
            report[f"compiled_{tag}_warmup_s"] = round(time.perf_counter() - t, 1)
            for b in batches:
                dt, steps = run(b)
                report[f"compiled_{tag}_batch{b}"] = {"seconds": round(dt, 3), "steps": int(steps),
                                                      "ms_per_step": round(1000 * dt / steps, 3),
                                                      "rtf_per_stream": round(dt / secs, 4),
                                                      "streams_x_realtime": round(b * secs / dt, 2)}
                report.save()
        except Exception as exc:  # noqa: BLE001 - the other figures stand; say why this one is missing
            report[f"compiled_{tag}_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:
            target.forward = original
        report.save()


def summarize_fastest(report) -> None:
    """``fastest``: per batch the quickest ms per step of every configuration that ran (eager included);
    ``best_aggregate``: the batch and configuration with the most streams' worth of real time, the
    figure voxc's concurrent streams are compared with (transformers' step hardly grows with its batch,
    being launch-bound, so the largest batch that fits tends to win)."""
    fastest = {}
    for key, figures in report.data.items():
        if isinstance(figures, dict) and "ms_per_step" in figures and "batch" in key:
            b = key.rsplit("batch", 1)[1]
            config = key.rsplit("_batch", 1)[0] if key.startswith("compiled_") else "eager"
            if b not in fastest or figures["ms_per_step"] < fastest[b]["ms_per_step"]:
                fastest[b] = {"config": config, "ms_per_step": figures["ms_per_step"],
                              "streams_x_realtime": figures["streams_x_realtime"]}
    report["fastest"] = fastest
    if fastest:
        batch, best = max(fastest.items(), key=lambda item: item[1]["streams_x_realtime"])
        report["best_aggregate"] = {"batch": int(batch), **best}
    report.save()


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path)
    ap.add_argument("--local", action="store_true", help="on the CPU, the artifact's config, float32")
    args = ap.parse_args(argv)
    if args.local:
        if args.artifact is None:
            ap.error("--local needs an artifact (its config and weights are used)")
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    secs = float(os.environ.get("SECS", 60))
    batches = [int(b) for b in os.environ.get("BATCHES", "1,16,64,128,256").split(",")]
    device, dtype_name = ("cpu", "float32") if args.local else ("cuda", "bfloat16")

    import torch
    import transformers
    from transformers import (VoxtralRealtimeConfig, VoxtralRealtimeFeatureExtractor,
                              VoxtralRealtimeForConditionalGeneration)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    report = common.Report("hf_baseline")
    report["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
    report["device"] = "cpu (local rehearsal)" if args.local else common.gpu_name()
    if args.local:
        common.setup(block_compiler=False)
        from voxc import artifact
        from voxc.config import ModelConfig
        from voxc.loader.hf import hf_config_dict

        voxc_cfg = ModelConfig.from_dict(artifact.read_manifest(args.artifact)["config"])
        cfg = VoxtralRealtimeConfig(**hf_config_dict(voxc_cfg))
    else:
        cfg = VoxtralRealtimeConfig()
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = VoxtralRealtimeForConditionalGeneration(cfg).to(getattr(torch, dtype_name)).eval()
    report["init_s"] = round(time.perf_counter() - t, 1)
    report["params_B"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    if args.artifact and has_weights(args.artifact):
        t = time.perf_counter()
        manifest = json.loads((args.artifact / "voxc-artifact.json").read_text())
        report["weights"] = {"from": str(args.artifact),
                             "tensors": load_voxc_weights(model, args.artifact, manifest["config"]),
                             "seconds": round(time.perf_counter() - t, 1)}
    else:
        report["weights"] = "transformers' own seeded random init"

    fe = VoxtralRealtimeFeatureExtractor()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(16000 * secs))).astype(np.float32)
    audio = np.concatenate([np.zeros(32 * 1280, np.float32), audio])
    audio = np.pad(audio, (0, (-len(audio)) % 1280 + 17 * 1280))
    feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features.to(device, getattr(torch, dtype_name))
    n_tok = feats.shape[-1] // 8
    prompt = torch.tensor([[1] + [32] * 38], device=device)
    report["audio_tokens"] = n_tok

    def run(b, max_new=None):
        f = feats.expand(b, -1, -1).contiguous()
        p = prompt.expand(b, -1).contiguous()
        new = max_new or n_tok - 39
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            g = model.generate(input_ids=p, input_features=f, do_sample=False, max_new_tokens=new, min_new_tokens=new)
        sync()
        return time.perf_counter() - t0, g.shape[1] - 39

    run(1, 20)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for b in batches if os.environ.get("HF_EAGER", "1") == "1" else ():   # HF_EAGER=0: compiled ones only
        try:
            dt, steps = run(b)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large batch: the others stand
            report[f"batch{b}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        report[f"batch{b}"] = {"seconds": round(dt, 3), "steps": int(steps), "ms_per_step": round(1000 * dt / steps, 3),
                               "rtf_per_stream": round(dt / secs, 4), "streams_x_realtime": round(b * secs / dt, 2)}
        report.save()
    if os.environ.get("HF_COMPILED", "1" if device == "cuda" else "0") == "1":
        compiled_runs(model, run, batches, secs, report, torch)
    summarize_fastest(report)
    if device == "cuda":
        report["peak_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    report.save()


if __name__ == "__main__":
    main()
