"""What every target module provides: how a Relax module is lowered, compiled, linked and packaged."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from voxc.errors import VoxcError


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
        """The model's Relax module and parameter list, plus the static-shape entry points of
        ``static_entries`` (a target class attribute; none by default)."""
        return export_with_static_entries(cfg, self, getattr(self, "static_entries", ()))

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


# A one-stream, one-token decode step with static shapes: its projections get GEMV kernels (a
# quantized layer picks GEMV for a static row count <= 16, GEMM otherwise) and no shape arithmetic;
# CompiledModel.decode uses it for single-token steps.
DECODE_B1N1 = ("decode_b1n1", "decode", (("b", 1), ("n", 1)))
# One stream's 80 ms streaming step (8 mel frames -> 4 encoder rows): quantized encoder projections
# run the GEMV kernel with 4 rows instead of the GEMM kernel, whose full dequantized weight panels
# cost as much at 4 rows as at 400 (llvm; on cuda dense static M=4 went to a slower dlight kernel).
ENCODE_B1T8 = ("encode_b1t8", "encode", (("b", 1), ("t", 8)))


def export_with_static_entries(cfg, target, entries):
    """voxc.build.export_graph, plus a static-shape copy of some entry points under new names; their
    private functions are renamed with the entry's name as suffix."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator
    from tvm.relax.frontend.nn import spec as nnspec

    from voxc.build import export_graph
    from voxc.model.graph import VoxtralGraph

    def graph():
        return VoxtralGraph(cfg, dtype=target.model_dtype, mel_dtype=target.mel_dtype)

    mod, params = export_graph(cfg, target)
    full_spec = graph().export_spec() if entries else {}
    for name, entry, values in entries:
        values = dict(values)
        static = {k: nnspec.Tensor([values.get(d, d) if isinstance(d, str) else d for d in v.shape], v.dtype)
                  for k, v in full_spec[entry].items()}
        part, _ = graph().export_tvm(spec={entry: static})

        @mutator
        class _Merge(PyExprMutator):
            def __init__(self, module):
                super().__init__(module)
                self.renamed = {}

            def visit_global_var_(self, op):
                return self.renamed.get(op, op)

            def merge(self):
                for gv, func in part.functions_items():
                    if not isinstance(func, relax.Function):
                        self.renamed[gv] = self.builder_.add_func(func, f"{gv.name_hint}__{name}")
                for gv, func in part.functions_items():
                    if isinstance(func, relax.Function):
                        if gv.name_hint != entry:
                            raise VoxcError(f"unexpected function {gv.name_hint} in the export of {entry}")
                        self.builder_.add_func(self.visit_expr(func).with_attr("global_symbol", name), name)
                return self.builder_.get()

        mod = _Merge(mod).merge()
    return mod, params
