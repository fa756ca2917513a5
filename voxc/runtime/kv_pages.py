"""KV-cache pages: one tower's pool of pages, its page table, and who holds which page.

A tower's KV cache (voxc.artifact.state_layout, schedules/ring_attention.py) is one pool tensor per
layer, ``[n_pages, 2, page_rows, heads, head_dim]``, shared by all streams through the page table
``[max_streams, pages_per_stream]`` int32: ring row ``r`` of the stream in slot ``s`` is row
``r % page_rows`` of page ``table[s, r // page_rows]`` of every layer's pool.  :class:`KvPages` keeps a
host copy of the table and a free list, and before each step hands pages to the ring rows the step
writes (:meth:`KvPages.ensure`): a stream holds pages only for the ring rows it has reached, so its
memory follows the audio it has heard, up to its whole window (after its ring wraps it holds them all).
:meth:`KvPages.release` gives a stream's pages back.  Table entries of rows a stream has not reached
point at page 0 (any page would do: no kernel lets a row that is not visible weigh in).

The pool starts with ``initial_pages`` pages and, when the free pages do not cover a step, grows by what
is missing plus a quarter of its size (voxc.artifact.KV_GROWTH_HEADROOM: not by doubling, which
overshoots by tens of GB on a large server), up to ``max_pages`` (by default every stream's whole
window): each layer's tensor is replaced by a larger one holding the old pages at the start (a device
copy) and zeros after them, one layer at a time, so a growth needs the memory of one more layer's pool
on top of the current ones. Each layer's page count is its own dimension of the compiled entry points,
so a growth that runs out of memory part-way leaves a valid state: the pool stays at its old size (the
layers already grown keep their larger tensors for the next try), and :class:`KvCacheFull` names what
did not fit and the slots whose step could not get its pages; the other streams are untouched.
"""
from __future__ import annotations

import heapq

import numpy as np

from voxc.artifact import KV_GROWTH_HEADROOM, StateEntry
from voxc.errors import VoxcError

# Zeros for a grown pool's new pages are copied on the device from a block of at most this size.
_ZERO_BLOCK_BYTES = 16 << 20


class KvCacheFull(VoxcError):
    """A step's streams could not all get the KV pages they need (the pool is at its maximum, or the
    device has no memory for a larger one).  ``slots``: the streams left without their pages."""

    def __init__(self, message: str, slots: list[int]):
        super().__init__(message)
        self.slots = list(slots)


class KvPages:
    """One tower's paged KV cache: ``tensors`` (one pool per layer, device), ``table`` (its device page
    table) and the allocator state on the host.

    ``rt``: a voxc Runtime, or None for the allocator alone (no device tensors; the unit tests).
    ``entry``: the cache's state entry (page layout); ``what``: how messages name it."""

    def __init__(self, rt, entry: StateEntry, dtype: str, max_streams: int, *, what: str,
                 initial_pages: int | None = None, max_pages: int | None = None):
        if not entry.paged:
            raise VoxcError(f"{what} is not a paged state entry")
        self.rt, self.what, self.dtype = rt, what, entry.dtype_for(dtype)
        self.page_rows, self.window = entry.page_rows, entry.window
        self.pages_per_stream, self.layers = entry.pages_per_stream, entry.tensors
        self.page_shape = entry.concrete_shape(1)[1:]
        self.page_bytes = entry.page_bytes(dtype)           # one page of one layer
        full = max_streams * self.pages_per_stream
        self.max_pages = full if max_pages is None else int(max_pages)
        if initial_pages is None:
            initial_pages = max_streams * entry.initial_pages_per_stream
        if isinstance(initial_pages, bool) or not isinstance(initial_pages, (int, np.integer)) or initial_pages < 1:
            raise VoxcError(f"the initial KV pages of {what} must be a whole number >= 1, not {initial_pages!r}")
        if not 1 <= self.max_pages <= full:
            raise VoxcError(f"the KV page maximum of {what} must be 1 to {full}, not {max_pages!r}")
        initial = min(int(initial_pages), self.max_pages)
        self.host_table = np.zeros((max_streams, self.pages_per_stream), np.int32)
        self.held = np.zeros((max_streams, self.pages_per_stream), bool)
        self.count = np.zeros(max_streams, np.int64)      # pages each slot holds
        self.size = initial                                # pages every layer's pool has
        self.free = list(range(initial))                   # a heap: the lowest free page first
        self.on_grow = []                                  # called before the tensors are replaced
        self.growths = 0
        self.tensors = [] if rt is None else [rt.zeros((initial, *self.page_shape), self.dtype)
                                              for _ in range(self.layers)]
        # the zeros new pages are copied from, made now: a growth happens when device memory is
        # fullest, and a temporary then could fail where the larger pool itself fits (64 streams
        # on an H100 did: every stream of that step failed)
        self._zero_block = None
        if rt is not None and self.max_pages > initial:
            block_pages = max(1, min(self.max_pages - initial, _ZERO_BLOCK_BYTES // self.page_bytes))
            self._zero_block = rt.zeros((block_pages, *self.page_shape), self.dtype)
        self.table = None if rt is None else rt.tensor(self.host_table)
        self._dirty: set[int] = set()

    # ---- accounting ------------------------------------------------------------------------
    @property
    def pages_in_use(self) -> int:
        return int(self.count.sum())

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the pages streams hold, all layers."""
        return self.pages_in_use * self.page_bytes * self.layers

    @property
    def bytes_allocated(self) -> int:
        """Bytes of the pools on the device, all layers (a failed growth's larger layers included)."""
        if not self.tensors:
            return self.size * self.page_bytes * self.layers
        return sum(int(t.shape[0]) for t in self.tensors) * self.page_bytes

    @property
    def max_bytes(self) -> int:
        return self.max_pages * self.page_bytes * self.layers

    def pages_of(self, slot: int) -> list[int]:
        """The pages slot ``slot`` holds, in ring order (unheld table entries left out)."""
        return [int(p) for p, h in zip(self.host_table[slot], self.held[slot]) if h]

    # ---- the allocator ---------------------------------------------------------------------
    def _pages_written(self, start: int, n: int) -> range | list[int]:
        """Table indices of the ring rows a step of ``n`` positions from ``start`` writes."""
        m = min(n, self.window)
        if m <= 0:
            return []
        if m == self.window:
            return range(self.pages_per_stream)
        first = (start + n - m) % self.window
        last = first + m - 1
        if last < self.window:
            return range(first // self.page_rows, last // self.page_rows + 1)
        # the rows wrap past the ring's end: its last pages, then its first ones (once each: a step that
        # wraps back into the page it started in, as with a one-page window, writes that page twice)
        return sorted({*range(first // self.page_rows, self.pages_per_stream),
                       *range(0, (last - self.window) // self.page_rows + 1)})

    def ensure(self, slots, starts, n: int) -> None:
        """Before a step of ``n`` positions of streams ``slots`` at positions ``starts``: every ring row
        it writes has a page (growing the pool if need be), and the device table is current."""
        wanted: list[tuple[int, int]] = []
        for slot, start in self._may_need_pages(slots, starts, int(n)):
            wanted += [(slot, j) for j in self._pages_written(start, int(n)) if not self.held[slot, j]]
        if wanted:
            if len(wanted) > len(self.free):
                try:
                    self._grow(len(wanted))
                except KvCacheFull as exc:
                    short = self._assign(wanted)
                    self.upload()
                    raise KvCacheFull(str(exc), short) from None
            self._assign(wanted)
        self.upload()

    def _may_need_pages(self, slots, starts, n: int) -> list[tuple[int, int]]:
        """(slot, start) of the streams of a step that may write a ring row without a page.  Most steps
        write rows of pages their streams already hold (a page holds 64 or more rows, a step writes 1 or
        4): those are found for the whole batch at once (240 streams: 0.016 ms a call where the
        per-stream walk took 0.17 ms; a 240-stream step on an H100 waits 6.9 ms on the host).  A stream that
        holds its whole ring never needs one; the rest (the step's rows wrap past the ring's end, span
        more than two pages, or reach an unheld page) go to the exact per-stream walk."""
        slots = np.asarray(slots, np.int64).reshape(-1)
        starts = np.asarray(starts, np.int64).reshape(-1)
        rows = min(n, self.window)
        if rows <= 0 or not slots.size:
            return []
        first = (starts + n - rows) % self.window
        last = first + rows - 1
        first_page, last_page = first // self.page_rows, np.minimum(last, self.window - 1) // self.page_rows
        simple = (last < self.window) & (last_page - first_page <= 1)
        covered = simple & self.held[slots, first_page] & self.held[slots, last_page]
        maybe = ~covered & (self.count[slots] < self.pages_per_stream)
        return list(zip(slots[maybe].tolist(), starts[maybe].tolist()))

    def _assign(self, wanted: list[tuple[int, int]]) -> list[int]:
        """Hand free pages to ``wanted`` (slot, table index) in order; returns the slots left without."""
        short = []
        for slot, j in wanted:
            if not self.free:
                if slot not in short:
                    short.append(slot)
                continue
            page = heapq.heappop(self.free)
            self.host_table[slot, j] = page
            self.held[slot, j] = True
            self.count[slot] += 1
            self._dirty.add(slot)
        return short

    def release(self, slot: int) -> None:
        """Give slot ``slot``'s pages back (its stream ended, or a new one starts in it)."""
        if not self.count[slot]:
            return
        for page in self.host_table[slot][self.held[slot]]:
            heapq.heappush(self.free, int(page))
        self.host_table[slot] = 0
        self.held[slot] = False
        self.count[slot] = 0
        self._dirty.add(slot)

    def upload(self) -> None:
        """Copy the table rows changed since the last upload to the device (one copy of the rows from
        the first changed slot to the last)."""
        if not self._dirty:
            return
        lo, hi = min(self._dirty), max(self._dirty) + 1
        self._dirty.clear()
        if self.table is None:
            return
        rows = self.host_table[lo:hi]
        self.rt.copy_into(self.rt.view(self.table, rows.shape, lo * rows.shape[1] * 4), rows)

    # ---- growth ------------------------------------------------------------------------------
    def _grow(self, wanted: int) -> None:
        """Room for ``wanted`` free pages: grow the pool by what is missing plus a quarter of its size
        (headroom, so the next steps do not each grow it), up to its maximum; if the device has no memory
        for that, by an eighth (or what is missing) only, so a nearly full device still fits what the
        streams need.  Raises KvCacheFull if the pool still lacks pages (it grew as far as it could)."""
        more = wanted - len(self.free)
        target = min(self.size + more + self.size // KV_GROWTH_HEADROOM, self.max_pages)
        try:
            self.grow_to(target)
        except KvCacheFull:
            modest = min(self.max_pages, self.size + max(more, self.size // 8))
            if modest >= target:
                raise
            self.grow_to(modest)
        if len(self.free) < wanted:
            raise KvCacheFull(f"{self.what} is full: all {self.max_pages} of its pages ({self.page_rows} rows each) "
                              f"are held by streams, {wanted - len(self.free)} more needed", [])

    def grow_to(self, pages: int) -> None:
        """Every layer's pool to ``pages`` pages (old pages kept, new ones zero), one layer at a time."""
        old = self.size
        if pages <= old:
            return
        for hook in self.on_grow:       # e.g. a captured CUDA graph holding the old tensors lets go
            hook()
        for i, tensor in enumerate(self.tensors):
            have = int(tensor.shape[0])
            if have >= pages:
                continue                 # grown by an earlier, failed growth
            try:
                bigger = self._empty_pool(pages)
            except VoxcError as exc:
                more = (pages - old) * self.page_bytes
                raise KvCacheFull(
                    f"out of device memory for {self.what}: its pages could not grow from {old} to {pages} "
                    f"({more / 2**20:.0f} MiB more for each of its {self.layers} layers; layer {i} failed: "
                    f"{str(exc).splitlines()[0][:200]}); fewer streams at once, or a smaller max_streams, need "
                    f"less", []) from None
            self.rt.copy(tensor, self.rt.view(bigger, tensor.shape))
            self._zero_rows(bigger, have, pages)
            self.tensors[i] = bigger
            del tensor
        for page in range(old, pages):
            heapq.heappush(self.free, page)
        self.size = pages
        self.growths += 1

    def _empty_pool(self, pages: int):
        """One layer's pool of ``pages`` pages; if the device is out of memory, once more after the VMs'
        allocator gave back the intermediates it keeps for reuse (a long run at many batch shapes
        gathers them).  Safe because the ``on_grow`` hooks ran first: a captured CUDA graph, which
        replays into such buffers, has let go of them."""
        shape = (pages, *self.page_shape)
        try:
            return self.rt.empty(shape, self.dtype)
        except VoxcError:
            if not self.rt.release_cached_memory():
                raise
        return self.rt.empty(shape, self.dtype)

    def _zero_rows(self, tensor, first: int, last: int) -> None:
        """Zero pages ``first`` .. ``last - 1`` of one layer's pool (device copies of the zero block)."""
        zeros = self._zero_block
        per_copy = int(zeros.shape[0])
        page = first
        while page < last:
            count = min(per_copy, last - page)
            src = zeros if count == per_copy else self.rt.view(zeros, (count, *self.page_shape))
            self.rt.copy(src, self.rt.view(tensor, (count, *self.page_shape), page * self.page_bytes))
            page += count
