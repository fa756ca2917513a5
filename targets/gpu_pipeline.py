"""The Relax pipeline of the GPU targets (cuda, webgpu): library dispatch, legalize + fuse, voxc's
row-count dispatch, dlight's default schedules, lowering and finalization."""
from __future__ import annotations


def gpu_relax_pipeline(target, small_m_tiers, backend, name: str, report=None):
    """``backend``'s (a ``tvm.relax.backend.*.pipeline`` module) GPU pipeline: library dispatch,
    legalize + fuse, then :func:`small_m_dispatch` (if ``small_m_tiers``) before dlight's default
    rules, dataflow lowering and finalization.  ``report`` (a targets.base.CompileReport) collects
    the functions that got per-tier kernels."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    schedule = ([small_m_dispatch(target, small_m_tiers, report)] if small_m_tiers else []) + [
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


def small_m_dispatch(target, tiers, report=None):
    """For each PrimFunc that dlight's Matmul rule takes and whose output rows M are symbolic, build one
    schedule per tier of ``tiers`` (LowBatchGEMV with that bucket) plus the Matmul one, and pick among
    them on the host: ``if M <= 64: <LowBatchGEMV> else: <Matmul>`` (more tiers nest)."""
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
