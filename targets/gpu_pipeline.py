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
