"""CPU (llvm): the embedded default.  Default pipeline (legalize, fuse, CPU schedules), a shared library."""
from __future__ import annotations

import dataclasses

from targets.base import TargetSpec


@dataclasses.dataclass(frozen=True)
class LlvmTarget(TargetSpec):
    name: str = "llvm"
    device_kind: str = "cpu"
    library_name: str = "model.so"
    mcpu: str | None = None     # e.g. "znver4"; None = generic x86-64 so the artifact runs anywhere

    def tvm_target(self):
        import tvm

        desc = {"kind": "llvm"}
        if self.mcpu:
            desc["mcpu"] = self.mcpu
        return tvm.target.Target(desc)


TARGET = LlvmTarget()
