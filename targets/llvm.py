"""CPU (llvm): the embedded default.  TVM's default CPU pipeline after voxc's transpose-matmul fusion;
quantized projections bring their own hand-scheduled kernels (schedules/dequant_matmul.py)."""
from __future__ import annotations

import dataclasses

from targets.base import TargetSpec


@dataclasses.dataclass(frozen=True)
class LlvmTarget(TargetSpec):
    name: str = "llvm"
    device_kind: str = "cpu"
    library_name: str = "model.so"
    mcpu: str | None = None     # e.g. "znver4"; None = generic x86-64 so the artifact runs anywhere

    def compile(self, mod):
        from targets.passes import fuse_transpose_matmul

        # nn.Linear is matmul(x, permute_dims(W)); unfused, every call copies W^T (8x slower decode
        # measured on a 60M-parameter decoder on this machine)
        return super().compile(fuse_transpose_matmul(mod))

    def tvm_target(self):
        import tvm

        desc = {"kind": "llvm"}
        if self.mcpu:
            desc["mcpu"] = self.mcpu
        return tvm.target.Target(desc)


TARGET = LlvmTarget()
