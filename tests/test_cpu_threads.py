"""How many threads voxc's CPU kernels get: the physical cores the process may use.

TVM's thread pool alone takes half the logical CPUs on x86 (it assumes two hyper-threads a core), so a
VM or container whose CPUs are all cores ran on half of them; voxc sets TVM_NUM_THREADS to the
physical cores unless the user set it (or OMP_NUM_THREADS)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from voxc.runtime.tvm_runtime import physical_cores

ROOT = Path(__file__).resolve().parent.parent


def fake_sysfs(root: Path, cores_of_cpu: dict[int, tuple[int, int]], cpu_max: str | None = None) -> Path:
    """/sys with ``cpuN/topology/{physical_package_id,core_id}`` per logical CPU (None: no topology)."""
    for cpu, where in cores_of_cpu.items():
        topology = root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        if where is not None:
            (topology / "physical_package_id").write_text(f"{where[0]}\n")
            (topology / "core_id").write_text(f"{where[1]}\n")
    if cpu_max is not None:
        (root / "fs" / "cgroup").mkdir(parents=True)
        (root / "fs" / "cgroup" / "cpu.max").write_text(cpu_max + "\n")
    return root


def test_hyper_threads_of_a_core_count_once(tmp_path):
    sysfs = fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    assert physical_cores(sysfs, cpus=range(6)) == 3          # 2 cores of package 0, 1 of package 1
    assert physical_cores(sysfs, cpus=[0, 2]) == 1             # an affinity mask of one core's two threads


def test_cpus_without_topology_count_as_cores(tmp_path):
    sysfs = fake_sysfs(tmp_path, {0: None, 1: None, 2: None})
    assert physical_cores(sysfs, cpus=range(3)) == 3
    assert physical_cores(tmp_path / "nothing", cpus=range(5)) == 5


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", 8), ("150000 100000", 2), ("50000 100000", 1),
                                               ("800000 100000", 8)])
def test_a_cgroup_quota_caps_the_threads(tmp_path, cpu_max, expected):
    sysfs = fake_sysfs(tmp_path, {cpu: (0, cpu) for cpu in range(8)}, cpu_max)
    assert physical_cores(sysfs, cpus=range(8)) == expected


def _pool_threads(env_extra: dict[str, str]) -> int:
    """runtime.NumThreads in a fresh process that loads voxc's runtime (as an artifact load does)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    code = ("from voxc.runtime.tvm_runtime import load_runtime\n"
            "print(int(load_runtime('cpu').get_global_func('runtime.NumThreads')()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_the_runtime_uses_every_physical_core():
    assert _pool_threads({}) == physical_cores()


def test_the_users_thread_count_wins():
    assert _pool_threads({"TVM_NUM_THREADS": "1"}) == 1
    assert _pool_threads({"OMP_NUM_THREADS": "1"}) == 1
