"""What every target module provides: how a Relax module is lowered, compiled, linked and packaged."""
from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str                 # the --target value
    device_kind: str          # the runtime device that runs the artifact
    library_name: str         # file the compiled module is exported to inside the artifact
    model_dtype: str = "float32"
    mel_dtype: str = "float64"  # WebGPU has no f64

    def tvm_target(self):
        raise NotImplementedError

    def export_graph(self, cfg):
        """The model's Relax module and parameter list; targets may add entry points."""
        from voxc.build import export_graph

        return export_graph(cfg, self)

    def compile(self, mod):
        """Relax IRModule -> executable; targets override to add their schedules and passes."""
        import tvm

        target = self.tvm_target()
        with target:
            return tvm.compile(mod, target=target)

    def export(self, executable, out_dir: Path) -> Path:
        path = out_dir / self.library_name
        executable.export_library(str(path))
        return path
