"""A small Relax nn.Module that exercises the kernels the real model needs (RMSNorm, Linear with
bias, softmax attention over a dynamic sequence dim) so the WebGPU/Vulkan toolchain can be tested
before the Voxtral model exists. Shapes are tiny so every build stays fast."""
from __future__ import annotations

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

DIM, HEADS = 64, 4


class ToyBlock(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS, dtype: str = "float32"):
        self.dim, self.heads, self.dtype = dim, heads, dtype
        self.norm = nn.RMSNorm(dim, axes=-1, epsilon=1e-5, bias=False, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True, dtype=dtype)
        self.out = nn.Linear(dim, dim, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(self.norm(x))
        qkv = op.reshape(qkv, (b, s, 3, self.heads, hd))
        q, k, v = op.split(qkv, 3, axis=2)
        q, k, v = (op.permute_dims(op.reshape(t, (b, s, self.heads, hd)), (0, 2, 1, 3)) for t in (q, k, v))
        att = op.matmul(q, op.permute_dims(k, (0, 1, 3, 2))) * (1.0 / float(np.sqrt(hd)))
        att = op.softmax(att, axis=-1)
        y = op.permute_dims(op.matmul(att, v), (0, 2, 1, 3))
        return x + self.out(op.reshape(y, (b, s, d)))


def export(dtype: str = "float32"):
    """Relax IRModule with a symbolic `seq` dim plus the parameter names in argument order."""
    m = ToyBlock(dtype=dtype)
    mod, params = m.export_tvm(spec={"forward": {"x": spec.Tensor((1, "seq", DIM), dtype)}})
    return mod, [name for name, _ in params]


def random_params(names: list[str], seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    shapes = {"norm.weight": (DIM,), "qkv.weight": (3 * DIM, DIM), "qkv.bias": (3 * DIM,),
              "out.weight": (DIM, DIM)}
    rng = np.random.default_rng(seed)
    out = {}
    for n in names:
        a = rng.standard_normal(shapes[n]).astype("float32") * (0.1 if n != "norm.weight" else 1.0)
        out[n] = (a + (1.0 if n == "norm.weight" else 0.0)).astype(dtype)
    return out
