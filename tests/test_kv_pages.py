"""The KV-cache page allocator (voxc.runtime.kv_pages) on its own: pages per ring row a step writes, no
page held by two live streams, release and reuse, growth by doubling with the old pages kept (on the
CPU runtime's tensors), refusal past the maximum and a growth that runs out of memory, each with one
clear line, leaving the other streams' pages as they were."""
from __future__ import annotations

import numpy as np
import pytest

from voxc.artifact import StateEntry
from voxc.errors import VoxcError
from voxc.runtime.kv_pages import KvCacheFull, KvPages


def _entry(window=100, page_rows=8, heads=2, head_dim=4, layers=3, initial=1):
    return StateEntry((None, 2, page_rows, heads, head_dim), layers=layers, axis="pages", page_rows=page_rows,
                      pages_per_stream=-(-window // page_rows), window=window, page_table="t",
                      initial_pages_per_stream=initial)


def _live_pages_are_distinct(pool: KvPages, streams: int):
    held = [p for s in range(streams) for p in pool.pages_of(s)]
    assert len(held) == len(set(held)), held
    assert not set(held) & set(pool.free)
    assert all(0 <= p < pool.size for p in held)
    assert len(held) + len(pool.free) == pool.size


def test_a_step_gets_pages_for_the_rows_it_writes():
    pool = KvPages(None, _entry(window=100, page_rows=8), "float32", 2, what="the test cache", initial_pages=64)
    assert pool.pages_per_stream == 13                       # 12 pages of 8 rows and one of 4
    pool.ensure([0], [0], 39)                                # a prompt: rows 0..38
    assert pool.held[0].tolist() == [True] * 5 + [False] * 8
    pool.ensure([0], [39], 1)                                # row 39: already held
    assert pool.pages_in_use == 5
    pool.ensure([0], [40], 1)                                # row 40: page 5
    assert pool.count[0] == 6 and pool.held[0, 5]
    pool.ensure([1], [95], 10)                               # rows 95..99 and 0..4: pages 11, 12 and 0
    assert pool.held[1].nonzero()[0].tolist() == [0, 11, 12]
    pool.ensure([1], [7], 250)                               # longer than the window: every page
    assert pool.count[1] == 13
    _live_pages_are_distinct(pool, 2)
    # rows not reached point at page 0 in the table
    assert (pool.host_table[0][~pool.held[0]] == 0).all()


@pytest.mark.parametrize("window, page_rows, start, n, pages", [(16, 16, 12, 9, [0]), (32, 16, 20, 30, [0, 1]),
                                                              (20, 8, 14, 19, [0, 1, 2])])
def test_a_step_that_wraps_into_its_first_page_takes_it_once(window, page_rows, start, n, pages):
    # (the batched check of a 16-row decoder window found a stream given two pages for one ring page,
    # the first leaked, and the pool "full" with one page a stream)
    streams = 3
    pool = KvPages(None, _entry(window=window, page_rows=page_rows), "float32", streams, what="the test cache",
                   initial_pages=1)
    for slot in range(streams):
        pool.ensure([slot], [start], n)
        assert pool.held[slot].nonzero()[0].tolist() == pages
        assert pool.count[slot] == len(pages)
    _live_pages_are_distinct(pool, streams)
    assert pool.pages_in_use == streams * len(pages) <= pool.max_pages


@pytest.mark.parametrize("seed", range(3))
def test_random_streams_never_share_a_page(seed):
    rng = np.random.default_rng(seed)
    streams = 5
    pool = KvPages(None, _entry(window=37, page_rows=4), "float32", streams, what="the test cache", initial_pages=1)
    positions = [0] * streams
    for _ in range(400):
        slot = int(rng.integers(streams))
        if rng.random() < 0.08:
            pool.release(slot)
            positions[slot] = 0
        else:
            n = int(rng.choice([1, 1, 1, 3, 8, 40]))
            pool.ensure([slot], [positions[slot]], n)
            positions[slot] += n
        _live_pages_are_distinct(pool, streams)
        for s in range(streams):   # a stream holds exactly the pages of the ring rows it reached
            reached = min(positions[s], 37)
            assert pool.count[s] == -(-reached // 4) or positions[s] >= 37 and pool.count[s] == 10
    assert pool.size <= pool.max_pages == streams * 10


def test_release_gives_the_pages_back_and_a_new_stream_reuses_them():
    pool = KvPages(None, _entry(window=16, page_rows=4), "float32", 2, what="the test cache", initial_pages=8)
    pool.ensure([0, 1], [0, 0], 9)                            # 3 pages each
    first = pool.pages_of(0)
    pool.release(0)
    assert pool.count[0] == 0 and (pool.host_table[0] == 0).all() and pool.pages_in_use == 3
    pool.ensure([0], [0], 12)
    assert sorted(pool.pages_of(0)) == sorted(first)          # the lowest free pages first: the same ones
    _live_pages_are_distinct(pool, 2)
    pool.release(0)
    pool.release(0)                                           # twice: nothing more happens
    assert pool.pages_in_use == 3


def test_the_pool_grows_by_what_is_missing_plus_a_quarter_and_keeps_every_page():
    from voxc.runtime.tvm_runtime import Runtime

    rt = Runtime("cpu")
    pool = KvPages(rt, _entry(window=20, page_rows=4, layers=2), "float32", 4, what="the test cache", initial_pages=1)
    grown = []
    pool.on_grow.append(lambda: grown.append(pool.size))
    pool.ensure([0], [0], 3)
    assert pool.size == 1 and not grown
    # a page of each layer, filled with its (layer, page) number
    def fill():
        for layer, t in enumerate(pool.tensors):
            data = rt.numpy(t)
            for p in range(pool.size):
                data[p] = 100 * layer + p
            rt.copy_into(t, data)
    fill()
    pool.ensure([1], [0], 9)                                  # 3 pages more (+ a quarter of 1: none): 1 -> 4
    assert pool.size == 4 and grown == [1] and pool.growths == 1
    for layer, t in enumerate(pool.tensors):
        data = rt.numpy(t)
        assert t.shape[0] == 4 and (data[0] == 100 * layer).all() and (data[1:] == 0).all()
    pool.ensure([2, 3], [0, 0], 20)                           # 10 more + a quarter of 4: 4 -> 15
    assert pool.size == 15 and pool.growths == 2 and len(pool.free) == 1
    pool.ensure([0, 1], [3, 9], 17)                           # 6 wanted, 1 free: 15 -> 20 (the maximum)
    assert pool.size == 20 == pool.max_pages == pool.pages_in_use and not pool.free
    _live_pages_are_distinct(pool, 4)
    # the device table holds what the host says
    assert (rt.numpy(pool.table) == pool.host_table).all()
    assert pool.bytes_in_use == pool.pages_in_use * 2 * 4 * 2 * 4 * 4 * 2
    assert pool.bytes_allocated == 20 * 2 * 4 * 2 * 4 * 4 * 2


def test_past_the_maximum_is_refused_naming_the_cache_and_the_streams():
    pool = KvPages(None, _entry(window=16, page_rows=4), "float32", 3, what="the decoder's KV cache",
                   initial_pages=2, max_pages=6)
    pool.ensure([0], [0], 16)                                 # 4 pages
    before = pool.host_table.copy()
    with pytest.raises(KvCacheFull) as err:
        pool.ensure([1, 2], [0, 0], 8)                        # 2 + 2 pages, 2 free
    message = str(err.value)
    assert "\n" not in message and "the decoder's KV cache" in message and "all 6 of its pages" in message, message
    assert err.value.slots == [2]                             # slot 1 got the last two pages
    assert isinstance(err.value, VoxcError)
    assert (pool.host_table[0] == before[0]).all() and pool.count[0] == 4
    _live_pages_are_distinct(pool, 3)
    pool.release(1)
    pool.ensure([2], [0], 8)                                  # now there is room
    assert pool.count[2] == 2


def test_a_growth_without_memory_keeps_the_pool_and_names_what_did_not_fit():
    from voxc.runtime.tvm_runtime import Runtime

    class TightRuntime(Runtime):
        """The CPU runtime with a device that holds at most ``budget`` bytes of new tensors."""

        def __init__(self, budget):
            super().__init__("cpu")
            self.budget = budget

        def empty(self, shape, dtype):
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if size > self.budget:
                raise VoxcError(f"cannot allocate a {dtype} tensor of shape {list(shape)} on cpu: out of memory")
            return super().empty(shape, dtype)

    rt = TightRuntime(budget=1 << 30)
    pool = KvPages(rt, _entry(window=64, page_rows=4, layers=3), "float32", 4, what="the encoder's KV cache",
                   initial_pages=4)
    page = pool.page_bytes
    pool.ensure([0], [0], 16)                                 # the 4 pages
    old = [t for t in pool.tensors]
    rt.budget = 5 * page                                      # room for 5 pages a layer, not 6
    pool.ensure([1], [0], 4)                                  # 1 + a quarter (6) fails; what is missing (5) fits
    assert pool.size == 5 and all(t.shape[0] == 5 for t in pool.tensors)
    rt.budget = 5 * page                                      # no room for any larger layer
    with pytest.raises(KvCacheFull) as err:
        pool.ensure([2], [0], 4)
    message = str(err.value)
    assert "\n" not in message and "out of device memory for the encoder's KV cache" in message, message
    assert "from 5 to" in message and "3 layers" in message and err.value.slots == [2]
    assert pool.size == 5 and pool.count[0] == 4 and pool.count[1] == 1
    _live_pages_are_distinct(pool, 4)
    assert old  # the first pools were replaced, not leaked into the list
    assert len(pool.tensors) == 3


def test_a_growth_allocates_only_the_larger_pools():
    """Growth happens when device memory is fullest: besides each layer's larger pool it allocates
    nothing (the zero pages are copied from a block made with the pool), so a growth that fits in
    memory does not fail on a temporary (64 streams on an H100 did, failing every stream of the step);
    the old pages are kept and the new ones are zero."""
    from voxc.runtime.tvm_runtime import Runtime

    class CountingRuntime(Runtime):
        def __init__(self):
            super().__init__("cpu")
            self.allocated = []

        def empty(self, shape, dtype):
            self.allocated.append(tuple(shape))
            return super().empty(shape, dtype)

    rt = CountingRuntime()
    pool = KvPages(rt, _entry(window=64, page_rows=4, layers=3), "float32", 4, what="the test cache", initial_pages=2)
    pool.ensure([0], [0], 8)                                  # the 2 pages
    for t in pool.tensors:
        rt.copy_into(t, np.full(t.shape, 7.0, np.float32))   # stale contents a reused page would show
    rt.allocated.clear()
    pool.ensure([1], [0], 24)                                 # 6 pages more: 2 -> 8
    assert pool.size == 8
    assert rt.allocated == [(8, *pool.page_shape)] * 3, rt.allocated
    for t in pool.tensors:
        pages = rt.numpy(t)
        assert (pages[:2] == 7.0).all() and (pages[2:] == 0.0).all()


def test_a_growth_that_finds_the_device_full_asks_the_vm_for_its_cached_buffers_once():
    """TVM's pooled allocator keeps the freed intermediates of every batch shape run: a growth that
    fails asks the runtime to give them back (after the on_grow hooks let a captured graph go) and
    tries once more; a runtime without the hook, or still without room, fails as before."""
    from voxc.runtime.tvm_runtime import Runtime

    class CachingRuntime(Runtime):
        """A device whose free memory is ``budget`` bytes, ``cached`` more once the VM gives them back."""

        def __init__(self, budget, cached, hook=True):
            super().__init__("cpu")
            self.budget, self.cached, self.hook, self.events = budget, cached, hook, []

        def empty(self, shape, dtype):
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if size > self.budget:
                self.events.append("refused")
                raise VoxcError(f"cannot allocate a {dtype} tensor of shape {list(shape)} on cpu: out of memory")
            return super().empty(shape, dtype)

        def release_cached_memory(self):
            self.events.append("released")
            if not self.hook:
                return False
            self.budget += self.cached
            self.cached = 0
            return True

    def pool_on(rt):
        pool = KvPages(rt, _entry(window=64, page_rows=4, layers=2), "float32", 4, what="the decoder's KV cache",
                       initial_pages=4)
        pool.on_grow.append(lambda: rt.events.append("hooks"))
        pool.ensure([0], [0], 16)                             # the 4 pages
        return pool

    rt = CachingRuntime(budget=1 << 30, cached=0)
    pool = pool_on(rt)
    rt.budget, rt.cached = 4 * pool.page_bytes, 4 * pool.page_bytes
    pool.ensure([1], [0], 8)                                  # 2 more + a quarter: 7 pages a layer
    assert pool.size == 7 and rt.events == ["hooks", "refused", "released"], rt.events
    assert pool.count[1] == 2

    for hook in (False, True):                                # no hook / nothing cached: the growth fails
        rt = CachingRuntime(budget=1 << 30, cached=0, hook=hook)
        pool = pool_on(rt)
        rt.budget = 4 * pool.page_bytes
        with pytest.raises(KvCacheFull) as err:
            pool.ensure([1], [0], 8)
        assert "out of device memory for the decoder's KV cache" in str(err.value) and err.value.slots == [1]
        assert rt.events.count("released") == 2 and pool.size == 4   # once per try (7 pages, then 6)


def test_the_batch_filter_sends_every_stream_that_needs_a_page_to_the_exact_walk():
    """KvPages._may_need_pages (the whole batch at once) never drops a stream that the per-stream walk
    would give a page: random windows, page sizes, step lengths, positions and pages held."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        window = int(rng.integers(1, 60))
        page_rows = int(rng.integers(1, window + 1))
        streams = int(rng.integers(1, 9))
        pool = KvPages(None, _entry(window=window, page_rows=page_rows), "float32", streams, what="the test cache",
                       initial_pages=streams * -(-window // page_rows))
        pool.held[:] = rng.random(pool.held.shape) < 0.6
        pool.count[:] = pool.held.sum(axis=1)
        slots = rng.permutation(streams)[:int(rng.integers(1, streams + 1))]
        starts = rng.integers(0, 3 * window, slots.size)
        n = int(rng.integers(0, 2 * window + 2))
        exact = {(int(slot), int(start)) for slot, start in zip(slots, starts)
                 if pool.count[slot] < pool.pages_per_stream
                 and any(not pool.held[slot, j] for j in pool._pages_written(int(start), n))}
        assert exact <= set(pool._may_need_pages(slots, starts, n)), (trial, window, page_rows, n)
