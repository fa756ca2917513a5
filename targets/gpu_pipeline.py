"""The Relax pipeline of the GPU targets (cuda, webgpu): library dispatch, legalize + fuse, voxc's
row-count dispatch, dlight's default schedules, lowering and finalization."""
from __future__ import annotations


def gpu_relax_pipeline(target, small_m_tiers, backend, name: str, report=None, clamp_gemv_padding: bool = False):
    """``backend``'s (a ``tvm.relax.backend.*.pipeline`` module) GPU pipeline: library dispatch,
    legalize + fuse, then :func:`small_m_dispatch` (if ``small_m_tiers``) before dlight's default
    rules, dataflow lowering and finalization.  ``report`` (a targets.base.CompileReport) collects
    the functions that got per-tier kernels; ``clamp_gemv_padding``: see :func:`small_m_dispatch`."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    dispatch = [small_m_dispatch(target, small_m_tiers, report, clamp_gemv_padding)] if small_m_tiers else []
    schedule = dispatch + [
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                dl.gpu.Fallback())]

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target) + legalize + schedule
                + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))
            return seq(mod)

    return _pipeline


def small_m_dispatch(target, tiers, report=None, clamp_gemv_padding: bool = False):
    """For each PrimFunc that dlight's Matmul rule takes and whose output rows M are symbolic, build one
    schedule per tier of ``tiers`` (LowBatchGEMV with that bucket) plus the Matmul one, and pick among
    them on the host: ``if M <= 64: <LowBatchGEMV> else: <Matmul>`` (more tiers nest).
    ``clamp_gemv_padding``: the LowBatchGEMV kernels read without branches (:func:`clamp_padded_rows`)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    from tvm.sym.analyzer import Analyzer

    def rows(func):
        out = func.params[-1]
        shape = list(getattr(out, "shape", []) or [])
        if len(shape) < 2:
            return None
        m = shape[0]
        for d in shape[1:-1]:
            m = m * d
        m = Analyzer().simplify(m)
        return None if isinstance(m, tirx.IntImm) else m

    def scheduled(rule, func):
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule that cannot take this function
            return None
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        return None if sch is None else sch.mod["main"]

    @tvm.transform.module_pass(opt_level=0, name="VoxcSmallMDispatch")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            m = rows(func)
            if m is None:
                continue
            large = scheduled(dl.gpu.Matmul(), func)
            if large is None:
                continue
            small = [(limit, scheduled(dl.gpu.LowBatchGEMV(bucket), func)) for limit, bucket in tiers]
            if any(f is None for _, f in small):
                continue
            # only where every if_then_else of the schedule is pad_einsum's (a function's own may
            # guard real rows)
            if clamp_gemv_padding and not _has_if_then_else(func):
                small = [(limit, clamp_padded_rows(f)) for limit, f in small]
            body = large.body
            for limit, f in reversed(small):
                body = tirx.IfThenElse(tirx.op.tvm_thread_invariant(m <= limit), f.body, body)
            updates[gv] = func.with_body(body).with_attr("tirx.is_scheduled", True)
            if report is not None:
                report.small_m_dispatched.add(gv.name_hint)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _is_if_then_else(node) -> bool:
    import tvm

    return isinstance(node, tvm.ir.expr.Call) and node.op.name == "prim.if_then_else"


def _has_if_then_else(func) -> bool:
    """Whether ``func`` has an ``if_then_else``."""
    import tvm
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(func, (tvm.ir.expr.Call, lambda c: found.append(c) if _is_if_then_else(c) else None))
    return bool(found)


def clamp_padded_rows(func):
    """A LowBatchGEMV schedule (of a function with no ``if_then_else`` of its own) whose padded rows
    read the last real row instead of a guarded zero: ``if_then_else(row < rows, A[.., row, ..], 0)``
    -> ``A[.., min(row, rows - 1), ..]``.  The padding (rows up to a multiple of the bucket) is dlight's
    pad_einsum; a padded row's sum is never stored (the output's write is predicated on ``row < rows``)
    and rows do not mix, so the real rows' results are unchanged.

    Why: TVM's WGSL for a guarded load (an if_then_else, or a Select of a load) is an if/else, and
    SwiftShader, Chromium's software WebGPU, compiles a loop holding n branches in time and memory
    exponential in n (about 2x per branch, measured).  A bucket-16 GEMV whose K takes its workgroup more
    than one pass (K > 128: the stem's first convolution, 3 taps x 128 mel bins) has 64 guarded loads in
    its K loop: creating its pipeline took all 24 GB of this machine's memory, and Chromium lost the
    device.  Without branches it takes about 0.13 s."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def clamped(call):
        if not _is_if_then_else(call):
            return call
        cond, load, otherwise = call.args
        bounds = _row_bounds(cond)
        if (bounds is None or not isinstance(load, tvm.ir.expr.TensorLoad)
                or not isinstance(otherwise, (tirx.FloatImm, tirx.IntImm)) or otherwise.value != 0):
            return call
        indices = list(load.indices)
        for row, rows in bounds:
            at = [i for i, index in enumerate(indices) if tvm_ffi.structural_equal(index, row)]
            if not at:
                return call
            indices[at[0]] = tirx.min(row, rows - 1)
        return tirx.BufferLoad(load.source, indices)

    return tvm_ffi.structural_map(func, (tvm.ir.expr.Call, clamped), order="post")


def _row_bounds(cond):
    """``[(row, rows), ...]`` of a guard ``row < rows [and ...]``; None for any other condition."""
    from tvm import tirx

    if isinstance(cond, tirx.LT):
        return [(cond.a, cond.b)]
    if isinstance(cond, tirx.And):
        a, b = _row_bounds(cond.a), _row_bounds(cond.b)
        return None if a is None or b is None else a + b
    return None



WIDE_LANES = (4, 2)   # vector widths a storage binding may take (WGSL's vec4 / vec2)


def wide_storage_params(func):
    """A WGSL kernel whose 16/32-bit storage bindings are only ever accessed as aligned vectors of
    L lanes (index ``Ramp(base, 1, L)``, ``base`` provably a multiple of L), with those bindings
    declared as arrays of L-lane vectors and indexed by ``base / L``.  Every vector the kernel then
    reads is one whose L elements the scalar kernel read, so it lies within the binding whatever the
    binding's size (runtime-sized arrays: WGSL's arrayLength counts whole vectors).

    Why: TVM declares every binding as an array of scalars, so a 128-bit load becomes four 32-bit
    loads (``vec4<u32>(w[i], w[i + 1], w[i + 2], w[i + 3])``) and Dawn's robustness pass clamps each
    index on its own, which keeps the GPU's compiler from merging them: the Q4 GEMVs read their
    weights at 7-16% of a copy's bandwidth in Dawn where CUDA's form of the same kernels reaches
    40-75%.  A binding with any other use (a scalar or unaligned access, another width, the pointer
    passed on) keeps its scalar array.  Only device kernels change: the host binds the same buffers,
    whose sizes are at least the declared ones."""
    import tvm
    import tvm_ffi
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    if int(func.attrs.get("calling_conv", 0) if func.attrs else 0) != 2:   # not a device kernel
        return func
    candidates = {p.name: p for p in func.params
                  if isinstance(p.ty, tvm.ir.PointerType) and isinstance(p.ty.element_type, tvm.ir.PrimType)
                  and p.ty.element_type.dtype.lanes == 1 and p.ty.element_type.dtype.bits in (16, 32)}
    if not candidates:
        return func
    analyzer = Analyzer()
    tvm_ffi.structural_walk(func.body, ((tirx.LetStmt, tirx.Bind), lambda n: analyzer.bind(n.var, n.value)))

    # buffers declared over a candidate pointer: name -> (buffer, pointer)
    declared_over = {}

    def note_decl(decl):
        data = decl.data
        param = candidates.get(data.name) if isinstance(data, tirx.Var) else None
        if param is not None and param.same_as(data):
            declared_over[decl.buffer.name] = (decl.buffer, param)

    tvm_ffi.structural_walk(func.body, (tirx.DeclBuffer, note_decl))

    def param_of(buffer):
        buffer_and_param = declared_over.get(buffer.name)
        return buffer_and_param[1] if buffer_and_param and buffer_and_param[0].same_as(buffer) else None

    def multiple(expr, lanes):
        ms = analyzer.modular_set(expr)
        return ms.coeff % lanes == 0 and ms.base % lanes == 0

    lanes_of, refused = {}, set()

    def access(buffer, indices):
        param = param_of(buffer)
        if param is None:
            return
        index = indices[0] if len(indices) == 1 else None
        lanes = None
        if (isinstance(index, tirx.Ramp) and isinstance(index.stride, tirx.IntImm) and index.stride.value == 1
                and isinstance(index.lanes, tirx.IntImm) and int(index.lanes) in WIDE_LANES
                and multiple(index.base, int(index.lanes))):
            lanes = int(index.lanes)
        if lanes is None or lanes_of.setdefault(param.name, lanes) != lanes:
            refused.add(param.name)

    def declared(decl):
        param = param_of(decl.buffer)
        if param is None:
            return
        if len(decl.buffer.ty.shape) != 1:     # flattened by now; anything else is left alone
            refused.add(param.name)

    tvm_ffi.structural_walk(func.body, [
        (tvm.ir.expr.TensorLoad, lambda n: access(n.source, n.indices)),
        (tirx.BufferStore, lambda n: access(n.buffer, n.indices))])
    tvm_ffi.structural_walk(func.body, (tirx.DeclBuffer, declared))
    wide = {name: lanes for name, lanes in lanes_of.items() if name not in refused}
    if not wide:
        return func

    plain = Analyzer()   # simplifies the new indices without inlining the kernel's let-bound values
    new_params, new_buffers = {}, {}
    for name, lanes in wide.items():
        old = candidates[name]
        dtype = old.ty.element_type.dtype
        new_params[name] = tirx.Var(name, tvm.ir.PointerType(tvm.ir.PrimType(f"{dtype}x{lanes}"), "global"))

    def wide_buffer(buffer):
        param = param_of(buffer)
        if param is None or param.name not in wide:
            return None
        key = buffer.name
        if key not in new_buffers:
            lanes = wide[param.name]
            new_buffers[key] = tirx.decl_buffer((plain.simplify(buffer.ty.shape[0] // lanes),),
                                                new_params[param.name].ty.element_type.dtype, buffer.name,
                                                data=new_params[param.name])
        return new_buffers[key], wide[param.name]

    def wide_access(buffer, indices):
        """(vector buffer, [vector index]) for an access of a widened binding, else None."""
        found = wide_buffer(buffer)
        if found is None:
            return None
        vectors, lanes = found
        return vectors, [plain.simplify(indices[0].base // lanes)]

    def rewrite_load(node):
        access = wide_access(node.source, node.indices)
        return node if access is None else tirx.BufferLoad(*access)

    def rewrite_store(node):
        access = wide_access(node.buffer, node.indices)
        return node if access is None else tirx.BufferStore(access[0], node.value, access[1])

    def rewrite_decl(node):
        found = wide_buffer(node.buffer)
        return node if found is None else tirx.DeclBuffer(found[0], data=new_params[param_of(node.buffer).name])

    body = tvm_ffi.structural_map(func.body, [
        (tvm.ir.expr.TensorLoad, rewrite_load), (tirx.BufferStore, rewrite_store),
        (tirx.DeclBuffer, rewrite_decl)], order="post")
    # any use of an old pointer left (a call taking it, a buffer this pass did not see): keep the kernel
    left = []
    tvm_ffi.structural_walk(body, (tirx.Var, lambda v: left.append(v) if v.name in wide and any(
        v.same_as(candidates[n]) for n in wide) else None))
    if left:
        return func
    params = [new_params.get(p.name, p) if p.name in wide else p for p in func.params]
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs, func.span)


WGSL_TIR_PIPELINE = "voxc_wgsl"


def wgsl_tir_pipeline() -> str:
    """The name of TVM's default TIR pipeline with :func:`wide_storage_params` run on every device
    kernel after finalization (registered on first use; ``tvm.compile(..., tir_pipeline=name)``)."""
    import tvm
    from tvm.tirx import compilation_pipeline

    if WGSL_TIR_PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        def factory():
            lower, host, device = compilation_pipeline.get_tir_pipeline("default")
            widen = tvm.tirx.transform.prim_func_pass(lambda f, _m, _c: wide_storage_params(f), opt_level=0,
                                                      name="WideStorageParams")
            return lower, host, lambda: tvm.transform.Sequential([device(), widen])

        compilation_pipeline.register_tir_pipeline(WGSL_TIR_PIPELINE, factory)
    return WGSL_TIR_PIPELINE
