"""Elementwise (injective) kernels on the CPU: the activation, residual and RoPE PrimFuncs of TVM's
legalization that no other schedule takes, spread over the thread pool.

TVM's default llvm lowering runs an unscheduled PrimFunc on one thread.  That is cheap for a sum of
two 3072-wide rows, but not for kernels with transcendentals: the encoder's 4-frame step calls RoPE
(a power, a cosine and a sine per element) and SiLU (an exponential per element) 32 times each, and
on 16 Xeon cores those single-threaded calls took 18 ms of a 181 ms stream step (bench/RESULTS.md,
seventh run).  Here every producer block is inlined into the one output block, the output's loops
are fused into one and split into chunks of ``CHUNK`` elements that run ``parallel`` (a kernel too
small for one chunk keeps one thread: the pool's wake-up would cost more than it saves).
"""
from __future__ import annotations

from tvm import tirx

CHUNK = 1024      # elements per parallel task: ~1-10 us of work for the kernels above


def _spatial_only(sch, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def schedule_elementwise_llvm(func: tirx.PrimFunc, chunk: int = CHUNK) -> tirx.PrimFunc | None:
    """``func`` with its single injective output loop nest parallel in ``chunk``-element tasks, or None
    where it is not such a kernel (a reduction, several outputs, a block that cannot be inlined)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - a PrimFunc without TVM's root block (hand-written kernels)
        return None
    blocks = sch.get_child_blocks(root)
    if not blocks or not all(_spatial_only(sch, b) for b in blocks):
        return None
    if any(sch.get(loop).kind == tirx.ForKind.PARALLEL for b in blocks for loop in sch.get_loops(b)):
        return None                    # scheduled already
    for block in blocks[:-1]:          # producers (a split, a cast) into their consumer
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - e.g. a producer read by two consumers: leave the func as is
            return None
    blocks = sch.get_child_blocks(root)
    if len(blocks) != 1:
        return None
    loops = sch.get_loops(blocks[0])
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = sch.get(fused).extent
    if isinstance(extent, tirx.IntImm) and int(extent) < 2 * chunk:
        return None
    tasks, _ = sch.split(fused, factors=[None, chunk])
    sch.parallel(tasks)
    return sch.mod["main"]
