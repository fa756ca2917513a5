"""Relax passes shared by several targets."""
from __future__ import annotations


def fuse_transpose_matmul(mod):
    """``matmul(x, permute_dims(W))`` with a 2-D ``W`` -> one ``NT_matmul`` TE PrimFunc reading W as stored.

    (TVM's relax.transform.FuseTransposeMatmul does the same through a composite function, but its
    output trips FuseTIR's buffer check on this model; a plain call_te does not.)"""
    import tvm
    from tvm import relax, te, tirx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op, permute_op = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")

    def nt_matmul(x, w, out_dtype):
        # half-precision outputs still accumulate in float32 (as cuBLAS does), then round once
        acc = "float32" if out_dtype in ("float16", "bfloat16") else out_dtype
        k = te.reduce_axis((0, w.shape[1]), name="k")
        out = te.compute(tuple(x.shape[:-1]) + (w.shape[0],),
                         lambda *i: te.sum(x[i[:-1] + (k,)].astype(acc) * w[i[-1], k].astype(acc), axis=k),
                         name="NT_matmul")
        if acc != out_dtype:
            out = te.compute(out.shape, lambda *i: out[i].astype(out_dtype), name="NT_matmul_cast")
        return out

    @mutator
    class _Fuse(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != matmul_op or not isinstance(call.args[1], relax.Var):
                return call
            bound = self.lookup_binding(call.args[1])
            if not isinstance(bound, relax.Call) or bound.op != permute_op:
                return call
            w = bound.args[0]
            axes = bound.attrs.axes
            if w.ty.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
                return call
            x = call.args[0]
            lead = list(x.ty.shape.values[:-1])
            if len(lead) <= 1 or all(isinstance(d, tirx.IntImm) for d in lead):
                return self.builder_.call_te(nt_matmul, x, w, call.ty.dtype, primfunc_name_hint="NT_matmul")
            # [b, n, K] -> [b*n, K] when the rows are symbolic: one row axis, as dlight's LowBatchGEMV
            # expects (small_m_dispatch); costs the fusion of the epilogue into the matmul
            rows = lead[0]
            for d in lead[1:]:
                rows = rows * d
            x2 = self.builder_.emit(relax.op.reshape(x, lead[:0] + [rows, x.ty.shape.values[-1]]))
            out = self.builder_.emit(self.builder_.call_te(nt_matmul, x2, w, call.ty.dtype,
                                                           primfunc_name_hint="NT_matmul"))
            return relax.op.reshape(out, lead + [w.ty.shape.values[0]])

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return relax.transform.DeadCodeElimination()(self.builder_.get())

    return _Fuse(mod).run()


# ---- voxc's GPU kernels -------------------------------------------------------------------------------------
