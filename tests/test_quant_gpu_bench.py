"""bench/quant_gpu.py keeps working without a GPU: ``local`` builds tiny shapes with nvcc and checks
the manifest against the cubin (what ``run`` on a GPU machine relies on), and the manifest checker
and the launch-limit rules catch what they should."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quant_gpu  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="no CUDA toolkit (nvcc) on this machine")


@needs_nvcc
def test_local_mode_builds_and_checks_tiny_kernels(tmp_path):
    pytest.importorskip("tvm")
    out = tmp_path / "local"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quant_gpu.py"), "local", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "quant_gpu local: OK" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = {(e["qtype"], e["batch"]) for e in manifest["kernels"]}
    assert {("q4_0", 1), ("q8_0", 4), ("q4_k", None)} <= kinds
    assert quant_gpu.check_manifest(out) == []

    # the checker notices a kernel the cubin lacks, a parameter run cannot bind and an illegal launch
    broken = manifest["kernels"][0]
    manifest["kernels"].append({**broken, "kernel": "no_such_kernel"})
    manifest["kernels"].append({**broken, "kernel": broken["kernel"], "params": ["acc_ptr", "mystery_ptr"]})
    manifest["kernels"].append({**broken, "launch": {"blockIdx.x": 4, "threadIdx.z": 128}})
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = quant_gpu.check_manifest(out)
    assert any("no_such_kernel: not in kernels.cubin" in p for p in problems)
    assert any("mystery_ptr" in p for p in problems)
    assert any("block.z = 128 > 64" in p for p in problems)


def test_launch_rules():
    assert quant_gpu.launch_problems((32768, 1, 1), (32, 4, 1)) == []
    assert quant_gpu.launch_problems((1, 1, 1), (1, 1, 128)) == ["block.z = 128 > 64"]
    assert quant_gpu.launch_problems((1, 70000, 1), (32, 32, 2)) == ["grid.y = 70000 > 65535", "2048 threads per block > 1024"]


def test_gemm_launch_rows_come_from_the_row_count():
    entry = {"batch": None, "rows_per_block_y": 64, "launch": {"blockIdx.x": 48, "blockIdx.y": 1,
                                                              "threadIdx.x": 16, "threadIdx.y": 16}}
    assert quant_gpu._launch_dims(entry, 512) == ((48, 8, 1), (16, 16, 1))
    assert quant_gpu._launch_dims(entry, 65) == ((48, 2, 1), (16, 16, 1))


def test_launch_at_a_row_count_uses_the_recorded_launch():
    entry = {"batch": None, "rows_per_block_y": 4, "launch": {"blockIdx.x": 9, "blockIdx.y": 1, "threadIdx.x": 32},
             "launch_by_rows": {"3": {"blockIdx.x": 9, "blockIdx.y": 1, "threadIdx.x": 32},
                                "16": {"blockIdx.x": 9, "blockIdx.y": 4, "threadIdx.x": 32, "vthread.x": 2}}}
    assert quant_gpu._launch_dims(entry, 16) == ((9, 4, 1), (32, 1, 1))


def test_kernel_definition_is_the_body_not_the_declaration():
    source = ('extern "C" __global__ void a_kernel(int m);\nextern "C" __global__ void b_kernel(int m);\n'
              'extern "C" __global__ void a_kernel(int m) {\n  int x = 0;\n}\n'
              'extern "C" __global__ void b_kernel(int m) {\n  extern __shared__ uchar buf[];\n}\n')
    assert "extern __shared__" not in quant_gpu._kernel_definition(source, "a_kernel")
    assert "extern __shared__" in quant_gpu._kernel_definition(source, "b_kernel")
