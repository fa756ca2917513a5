"""The whole model as one Relax module for a target: the entry points of voxc.artifact.ENTRY_POINTS
plus the static-shape copies a target asks for (GraphOptions.static_entries)."""
from __future__ import annotations

from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.nn import spec as nnspec

from voxc.config import ModelConfig
from voxc.errors import VoxcError
from voxc.model.graph import GraphOptions, VoxtralGraph


def export_graph(cfg: ModelConfig, options: GraphOptions = GraphOptions()):
    """``(IRModule, [(name, nn.Parameter)])``: the graph's entry points and its ordered parameters.

    A static entry is exported from a fresh graph with that entry's symbolic dims fixed and merged
    in under its own name; its private functions get the entry's name as suffix."""
    graph = VoxtralGraph.build(cfg, options)
    mod, params = graph.export_tvm(spec=_with_param_mode(graph.export_spec(), options))
    for entry in options.static_entries:
        full = graph.export_spec()[entry.entry]
        values = dict(entry.dims)

        def fixed(arg):   # a tensor spec with the entry's dims fixed; a tuple's elements each
            if isinstance(arg, list):
                return [fixed(a) for a in arg]
            return nnspec.Tensor([values.get(d, d) if isinstance(d, str) else d for d in arg.shape], arg.dtype)

        static = {k: fixed(v) for k, v in full.items()}
        part, _ = VoxtralGraph.build(cfg, options).export_tvm(spec=_with_param_mode({entry.entry: static}, options))
        mod = _merge_entry(mod, part, entry.entry, entry.name)
    return mod, params


def _with_param_mode(specs: dict, options: GraphOptions) -> dict:
    if options.packed_params:
        for method in specs.values():
            method["$"] = {"param_mode": "packed", "effect_mode": "none"}
    return specs


def _merge_entry(mod, part, entry: str, name: str):
    """``mod`` plus ``part``'s function ``entry`` renamed ``name`` (and its callees renamed)."""

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

    return _Merge(mod).merge()
