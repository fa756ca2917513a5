"""Quantization as one pass over the model graph (as MLC-LLM's quantization mutators do).

The model is always written with dense layers (``nn.Linear``, :class:`DenseEmbedding`).  A build
that wants quantized weights calls :func:`quantize_graph` once on the whole graph, when every
layer's path, i.e. its weight name, is known: each projection and the token table are swapped for
voxc.model.quant_linear's layers of the storage :meth:`QuantPlan.storage` gives that weight.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from tvm.relax.frontend import nn

from voxc.loader.names import graph_weight_storage
from voxc.model.embedding import DenseEmbedding
from voxc.model.quant_linear import QuantEmbedding, QuantLinear
from voxc.quant.formats import QType


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """How a build stores its projection weights.

    ``qtype``: q4_0 / q4_k / q8_0 for every projection and the token table (None: dense), each
    falling back as :func:`voxc.quant.linear_storage` says where its rows do not fit the blocks.
    ``overrides``: weight name -> the storage a source file really has (a QType, or None for a
    float matrix), so a GGUF whose layers mix types runs each layer on its own blocks.
    ``kernel_target``: the target kind whose kernel schedules the quantized layers trace with.
    :meth:`storage` takes graph weight names (a stacked projection's type comes from its parts').
    """

    qtype: str | None = None
    overrides: Mapping[str, QType | None] = dataclasses.field(default_factory=dict)
    kernel_target: str | None = None

    def storage(self, weight_name: str, in_features: int) -> QType | None:
        return graph_weight_storage(weight_name, in_features, self.qtype, self.overrides)

    @property
    def active(self) -> bool:
        return self.qtype is not None or any(v is not None for v in self.overrides.values())


def quantize_graph(root: nn.Module, plan: QuantPlan) -> nn.Module:
    """Swap the dense projections and token table of ``root`` for quantized ones, in place."""
    if not plan.active:
        return root

    def swap(path: str, layer: nn.Module) -> nn.Module | None:
        name = f"{path}.weight"
        if isinstance(layer, nn.Linear):
            storage = plan.storage(name, layer.in_features)
            if storage is None:
                return None
            return QuantLinear(layer.in_features, layer.out_features, storage, bias=layer.bias is not None,
                               dtype=layer.weight.dtype, kernel_target=plan.kernel_target)
        if isinstance(layer, DenseEmbedding):
            vocab, dim = (int(s) for s in layer.weight.shape)
            storage = plan.storage(name, dim)
            if storage is None:
                return None
            return QuantEmbedding(vocab, dim, storage, dtype=layer.weight.dtype, kernel_target=plan.kernel_target)
        return None

    replace_modules(root, swap)
    return root


def replace_modules(root: nn.Module, swap: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Walk ``root``'s submodules by attribute path (``dec.layers.0.attention.wq``) and replace each
    one for which ``swap(path, module)`` returns a module; recurse into the others."""

    def visit(module: nn.Module, prefix: str):
        for attr, child in list(vars(module).items()):
            path = f"{prefix}{attr}"
            if isinstance(child, nn.ModuleList):
                for i, item in enumerate(child):
                    new = swap(f"{path}.{i}", item)
                    if new is not None:
                        child[i] = new
                    else:
                        visit(item, f"{path}.{i}.")
            elif isinstance(child, nn.Module):
                new = swap(path, child)
                if new is not None:
                    setattr(module, attr, new)
                else:
                    visit(child, f"{path}.")

    visit(root, "")
