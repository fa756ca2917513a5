"""The peer baseline on the same GPU: transformers' VoxtralRealtimeForConditionalGeneration, full-size
config, bf16, with voxc's random weights when an artifact with weights is given (else its own seeded
init). Offline generate of a SECS-second clip at batch 1 and BATCH; the recipe of
../shared/research/probes/hf_gpu_baseline.py. Writes $OUT/hf_baseline.json.

    python bench/cuda_hf_baseline.py [ARTIFACT_WITH_WEIGHTS]
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

SECS = float(os.environ.get("SECS", 60))
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,16").split(",")]


def load_voxc_weights(model, artifact: Path, cfg_dict: dict) -> int:
    """Copy an artifact's (voxc-named, official RoPE order) tensors into the HF model, as tests/oracle.py."""
    import torch
    from safetensors import safe_open

    common.setup(block_compiler=False)
    from voxc.loader import hf
    from voxc.loader.names import rope_rows
    from voxc.config import ModelConfig

    cfg = ModelConfig.from_dict(cfg_dict)
    manifest = json.loads((artifact / "voxc-artifact.json").read_text())
    state = model.state_dict()
    done = 0
    with torch.no_grad():
        for shard in manifest["weights"]:
            with safe_open(str(artifact / shard), "numpy") as f:
                for name in f.keys():
                    if name == "mel_frontend.filters":
                        continue
                    array = f.get_tensor(name)
                    heads = rope_rows(name, cfg)
                    if heads is not None:
                        array = hf.interleaved_to_split_half(array, heads)
                    target = state[hf.voxc_to_hf(name, in_memory=True)]
                    target.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(target.device, target.dtype))
                    done += 1
    return done


def main():
    import torch
    import transformers
    from transformers import (VoxtralRealtimeConfig, VoxtralRealtimeFeatureExtractor,
                              VoxtralRealtimeForConditionalGeneration)

    report = common.Report("hf_baseline")
    report["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
    report["gpu"] = common.gpu_name()
    cfg = VoxtralRealtimeConfig()
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = VoxtralRealtimeForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    report["init_s"] = round(time.perf_counter() - t, 1)
    report["params_B"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    artifact = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if artifact and json.loads((artifact / "voxc-artifact.json").read_text()).get("weights"):
        t = time.perf_counter()
        manifest = json.loads((artifact / "voxc-artifact.json").read_text())
        report["weights"] = {"from": str(artifact), "tensors": load_voxc_weights(model, artifact, manifest["config"]),
                             "seconds": round(time.perf_counter() - t, 1)}
    else:
        report["weights"] = "transformers' own seeded random init"

    fe = VoxtralRealtimeFeatureExtractor()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(16000 * SECS))).astype(np.float32)
    audio = np.concatenate([np.zeros(32 * 1280, np.float32), audio])
    audio = np.pad(audio, (0, (-len(audio)) % 1280 + 17 * 1280))
    feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features.to("cuda", torch.bfloat16)
    n_tok = feats.shape[-1] // 8
    prompt = torch.tensor([[1] + [32] * 38], device="cuda")
    report["audio_tokens"] = n_tok

    def run(b, max_new=None):
        f = feats.expand(b, -1, -1).contiguous()
        p = prompt.expand(b, -1).contiguous()
        new = max_new or n_tok - 39
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            g = model.generate(input_ids=p, input_features=f, do_sample=False, max_new_tokens=new, min_new_tokens=new)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, g.shape[1] - 39

    run(1, 20)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    for b in BATCHES:
        dt, steps = run(b)
        report[f"batch{b}"] = {"seconds": round(dt, 3), "steps": int(steps), "ms_per_step": round(1000 * dt / steps, 3),
                               "rtf_per_stream": round(dt / SECS, 4), "streams_x_realtime": round(b * SECS / dt, 2)}
        report.save()
    report["peak_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    report.save()


if __name__ == "__main__":
    main()
