"""Relax passes that swap parts of the model graph for voxc's kernels, shared by the targets."""
from __future__ import annotations


def fuse_transpose_matmul(mod):
    """``matmul(x, permute_dims(W))`` with a 2-D ``W`` -> one ``NT_matmul`` TE PrimFunc reading W as stored.

    (TVM's relax.transform.FuseTransposeMatmul does the same through a composite function, but its
    output trips FuseTIR's buffer check on this model; a plain call_te does not.)"""
    import tvm
    from tvm import relax, te, tirx

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

    def rewrite(builder, call):
        if call.op != matmul_op or not isinstance(call.args[1], relax.Var):
            return call
        bound = builder.lookup_binding(call.args[1])
        if not isinstance(bound, relax.Call) or bound.op != permute_op:
            return call
        w = bound.args[0]
        axes = bound.attrs.axes
        if w.ty.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
            return call
        x = call.args[0]
        bb = builder.builder_
        lead = list(x.ty.shape.values[:-1])
        if len(lead) <= 1 or all(isinstance(d, tirx.IntImm) for d in lead):
            return bb.call_te(nt_matmul, x, w, call.ty.dtype, primfunc_name_hint="NT_matmul")
        # [b, n, K] -> [b*n, K] when the rows are symbolic: one row axis, as dlight's LowBatchGEMV
        # expects (small_m_dispatch); costs the fusion of the epilogue into the matmul
        rows = lead[0]
        for d in lead[1:]:
            rows = rows * d
        x2 = bb.emit(relax.op.reshape(x, [rows, x.ty.shape.values[-1]]))
        out = bb.emit(bb.call_te(nt_matmul, x2, w, call.ty.dtype, primfunc_name_hint="NT_matmul"))
        return relax.op.reshape(out, lead + [w.ty.shape.values[0]])

    return _rewrite_calls(mod, rewrite)


# ---- voxc's GPU kernels -------------------------------------------------------------------------------------


def _rewrite_calls(mod, rewrite):
    """Every Relax function of ``mod`` with each call replaced by ``rewrite(builder, call)`` (the
    call itself, after its arguments were rewritten, to keep it); dead bindings removed."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            return rewrite(self, self.visit_expr_post_order(call))

        def run(self):
            for gv, func in mod.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return relax.transform.DeadCodeElimination()(self.builder_.get())

    return _Rewrite(mod).run()


def swap_ring_attention(mod, **layout):
    """Each call of a TE ``ring_attention*`` PrimFunc (voxc.model.layers.RingAttention) -> voxc's
    split-K GPU kernels (partial + merge, schedules/ring_attention.py) laid out by ``layout``
    (``cuda_kernel_layout``'s keyword arguments: threads, keys_per_split, max_splits); the append into
    an 8-bit cache -> its GPU form (a float cache's append is a plain spatial block dlight schedules)."""
    import tvm
    from tvm import relax, tirx

    from schedules import ring_attention as ra

    attention = {gv for gv, f in mod.functions_items()
                 if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("ring_attention")}
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        # an 8-bit cache's append quantizes each row: one warp per row (its max is a warp reduction);
        # the chunk's keys rounded as the cache rounds them: the same row layout
        if gv.name_hint.startswith("ring_append") and str(func.params[0].dtype) == "int8":
            k = func.params[1]
            window, page_rows = ra.ring_shape(func)
            mod[gv] = ra.ring_append_int8_func(int(k.shape[2]), int(k.shape[3]), window, str(k.dtype), page_rows,
                                               gpu=True)
        elif gv.name_hint.startswith("int8_roundtrip"):
            x = func.params[0]
            mod[gv] = ra.int8_roundtrip_func(int(x.shape[2]), int(x.shape[3]), str(x.dtype), gpu=True)
    if not attention:
        return mod
    call_tir = tvm.ir.Op.get("relax.call_tir")
    kernels = {}

    def kernels_for(builder, gv):
        if gv not in kernels:
            func = mod[gv]
            q, k, _, cache = func.params[:4]   # buffer params carry their shapes
            heads, head_dim = int(q.shape[2]), int(q.shape[3])
            kv_heads, dtype = int(k.shape[2]), str(q.dtype)
            window, page_rows = ra.ring_shape(func)
            shape = (heads, kv_heads, head_dim, window, dtype)
            splits = ra.cuda_kernel_layout(*shape, **layout)["n_splits"]
            partial = builder.builder_.add_func(ra.ring_attention_partial_cuda(
                *shape, page_rows=page_rows, kv_dtype=str(cache.dtype), **layout),
                                                gv.name_hint + "_partial")
            merge = builder.builder_.add_func(ra.ring_attention_merge_cuda(*shape, **layout), gv.name_hint + "_merge")
            kernels[gv] = (partial, merge, heads, head_dim, splits)
        return kernels[gv]

    def rewrite(builder, call):
        if call.op != call_tir or call.args[0] not in attention:
            return call
        partial, merge, heads, head_dim, splits = kernels_for(builder, call.args[0])
        out_info = call.ty_args[0]
        b, n = out_info.shape.values[0], out_info.shape.values[1]
        parts = builder.builder_.emit(relax.call_tir(partial, call.args[1], [
            relax.TensorType((b, n, heads, splits, head_dim), "float32"),
            relax.TensorType((b, n, heads, splits), "float32")]), "attn_parts")
        o = builder.builder_.emit(relax.TupleGetItem(parts, 0), "attn_o")
        lse = builder.builder_.emit(relax.TupleGetItem(parts, 1), "attn_lse")
        return relax.call_tir(merge, relax.Tuple([o, lse]), out_info)

    return _rewrite_calls(mod, rewrite)


def replace_greedy_topk(mod, threads: int = 256):
    """Every ``topk(x [b, n] f32/f16, k=1, largest, indices, int32)`` -> schedules/argmax.py's kernel
    (TVM's sort/argmax use int64 indices or blockIdx.z, neither of which WGSL has)."""
    import tvm
    from tvm import relax

    from schedules.argmax import argmax_rows_func
    from voxc.errors import VoxcError

    topk_op = tvm.ir.Op.get("relax.topk")
    kernels = {}   # logits dtype -> the kernel

    def rewrite(builder, call):
        if call.op != topk_op:
            return call
        a = call.attrs
        x = call.args[0].ty
        dtype = str(x.dtype)
        if (int(a.k) != 1 or a.ret_type != "indices" or not a.largest or str(a.dtype) != "int32"
                or x.ndim != 2 or int(a.axis) not in (-1, 1) or dtype not in ("float32", "float16")):
            raise VoxcError(f"unsupported topk ({a}); only greedy argmax is implemented")
        if dtype not in kernels:
            kernels[dtype] = builder.builder_.add_func(argmax_rows_func(threads, dtype), "argmax_rows")
        return relax.call_tir(kernels[dtype], [call.args[0]], relax.TensorType((x.shape.values[0], 1), "int32"))

    return _rewrite_calls(mod, rewrite)


def schedule_constant_matmuls(mod):
    """``matmul(x [b, f, K], C [K, N])`` with a constant ``C`` (the mel front end's DFT basis) ->
    schedules/const_matmul.py's plain kernel, one invocation per output."""
    import tvm
    from tvm import relax

    from schedules.const_matmul import const_matmul_func

    matmul_op = tvm.ir.Op.get("relax.matmul")
    kernels = {}

    def rewrite(builder, call):
        if call.op != matmul_op:
            return call
        const = call.args[1]
        if isinstance(const, relax.Var):
            const = builder.lookup_binding(const)
        x = call.args[0].ty
        if not isinstance(const, tvm.ir.expr.Constant) or x.ndim != 3:
            return call
        k_dim, n_dim = (int(d) for d in const.value.shape)
        dtype = str(x.dtype)
        key = (k_dim, n_dim, dtype)
        if key not in kernels:
            kernels[key] = builder.builder_.add_func(const_matmul_func(k_dim, n_dim, dtype), "const_matmul")
        b, f = x.shape.values[0], x.shape.values[1]
        return relax.call_tir(kernels[key], [call.args[0], call.args[1]], relax.TensorType((b, f, n_dim), dtype))

    return _rewrite_calls(mod, rewrite)


def swap_row_norms(mod, max_threads: int = 256):
    """Each ``residual_rms_norm`` TE PrimFunc (voxc.model.layers.residual_rms_norm, known by its
    ``voxc_kernel`` attribute) -> its GPU kernel (schedules/row_norm.py): one workgroup per row.
    (dlight's fallback schedule gives the sum of squares one thread per row.)  The kernel reads its
    row count from x's shape, so the calls lose the symbolic-shape arguments a TE function takes when
    x's shape is an expression (the encoder's frames: ``(t - 1) // 2 + 1``)."""
    import tvm
    from tvm import relax, tirx

    from schedules.row_norm import NAME, norm_threads, residual_rms_norm_gpu_func

    kernels = {}   # the TE function's GlobalVar -> the GPU kernel (added under a new one: another signature)
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and func.attrs.get("voxc_kernel") == NAME:
            buffer = func.params[0]   # x [b, n, dim]: buffer params carry their shapes
            row, dim = int(func.attrs["voxc_delay_row"]), int(buffer.shape[-1])
            kernels[gv] = residual_rms_norm_gpu_func(dim, float(func.attrs["voxc_eps"]), str(buffer.dtype),
                                                     None if row < 0 else row, norm_threads(dim, max_threads))
    if not kernels:
        return mod
    call_tir = tvm.ir.Op.get("relax.call_tir")
    added = {}

    def rewrite(builder, call):
        if call.op != call_tir or call.args[0] not in kernels:
            return call
        gv = call.args[0]
        if gv not in added:
            added[gv] = builder.builder_.add_func(kernels[gv], gv.name_hint)
        tensors = [a for a in call.args[1].fields if isinstance(a.ty, relax.TensorType)]
        return relax.call_tir(added[gv], relax.Tuple(tensors), list(call.ty_args[0].fields))

    return _rewrite_calls(mod, rewrite)
