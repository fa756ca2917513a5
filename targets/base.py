"""What every target module provides: how a Relax module is lowered, compiled, linked and packaged."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from voxc.artifact import NATIVE_SHARD_BYTES, TOKENIZER_FILE
from voxc.model.graph import GraphOptions
from voxc.model.quantization import QuantPlan


@dataclasses.dataclass
class CompileReport:
    """What a compile did, for benchmarks and tests: the functions given per-row-count kernels
    (targets.gpu_pipeline.small_m_dispatch) and the generated device source, where there is one."""
    small_m_dispatched: set[str] = dataclasses.field(default_factory=set)
    device_source: str | None = None


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str                 # the --target value
    device_kind: str          # the runtime device that runs the artifact
    library_name: str         # file the compiled module is exported to inside the artifact
    model_dtype: str = "float32"
    mel_dtype: str = "float64"  # WebGPU has no f64
    shard_bytes: int = NATIVE_SHARD_BYTES
    static_entries: tuple = ()   # voxc.artifact.StaticEntry copies of entry points with static shapes
    kv_int8: tuple = ()          # towers with 8-bit KV caches (voxc build --kv-int8; voxc.artifact.Int8KvPage)
    # whether this target compiles 8-bit KV caches: CUDA's kernels read them (llvm runs their reference
    # definition, for tests); WebGPU and Vulkan shaders have no 8-bit storage without extensions
    supports_kv_int8 = False

    def tvm_target(self):
        raise NotImplementedError

    def graph_options(self, quant: QuantPlan = QuantPlan()) -> GraphOptions:
        """How this target's graph differs from the common one (voxc.model.graph.GraphOptions)."""
        return GraphOptions(dtype=self.model_dtype, mel_dtype=self.mel_dtype,
                            quant=dataclasses.replace(quant, kernel_target=self.name),
                            static_entries=tuple(self.static_entries), kv_int8=tuple(self.kv_int8))

    def compile(self, mod, report: CompileReport | None = None):
        """Relax IRModule -> executable; targets override to add their schedules and passes."""
        import tvm

        target = self.tvm_target()
        with target:
            return tvm.compile(mod, target=target)

    def export(self, executable, out_dir: Path) -> Path:
        path = Path(out_dir) / self.library_name
        executable.export_library(str(path))
        return path

    def package(self, out_dir: Path, *, executable, tokenizer_bytes: bytes, params, cfg,
                weights_written: bool) -> dict:
        """Files besides the library and the weights; returns the manifest's extra fields."""
        (Path(out_dir) / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
        return {}

    def manifest_extras(self) -> dict:
        return {}
