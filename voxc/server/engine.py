"""The model side of the server: one worker thread advances every live stream in batched steps.

TVM calls block, so none of them runs on the event loop.  Connections (and HTTP requests) hand
audio to a :class:`Stream` from the loop; the worker thread, the only one that touches the model,
repeats a *tick*:

1. under the lock, take each stream's queued PCM (at most :data:`TICK_AUDIO_TOKENS` tokens of it per
   stream, so one client sending a long file at once cannot hold the others back), its end-of-audio
   mark and its abort mark;
2. free the slots of aborted streams, open a session (a KV-cache slot) for each new stream while
   slots are free, queue the PCM, and mark the end of audio where it came;
3. ``advance`` all sessions with work together (one batched encode per window length, one batched
   decode step for all streams past their prompt, until no stream can go further); streams whose KV
   pages do not fit on the device (voxc.runtime.kv_pages.KvCacheFull) end with that error and the
   others advance without them;
4. hand each stream its new text with timestamps (and its final text and usage when it ended) back
   to the event loop.

Admission: a server takes at most ``max_sessions`` connections (HTTP requests count too); each
holds a *lease* for its lifetime, and the model is loaded with as many slots.  A stream waits for a
free slot only for the moment between a finished utterance and the next one of the same connection,
or between a disconnect and the worker freeing that slot, so a lease always gets its slot.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from voxc.artifact import MAX_TOKENS_PER_ENCODE
from voxc.errors import VoxcError
from voxc.runtime.kv_pages import KvCacheFull
from voxc.runtime.session import advance
from voxc.server.timestamps import Piece, token_span

log = logging.getLogger("voxc.server")

TICK_AUDIO_TOKENS = MAX_TOKENS_PER_ENCODE   # audio a stream contributes to one tick: 2.56 s
MAX_BUFFERED_S = 30.0                       # a client sending faster waits (TCP backpressure) above this
LATENCY_WINDOW = 4096                        # ticks kept for the step-latency percentiles
RATE_WINDOW_S = 10.0                         # tokens/s is measured over this many seconds


@dataclass
class Output:
    """What a tick produced for one stream (delivered on the event loop)."""
    pieces: list[Piece] = field(default_factory=list)
    done: bool = False
    usage: dict | None = None
    duration: float = 0.0
    error: str | None = None


class Stream:
    """One utterance: PCM in, timed text out.  Created, fed and ended from the event loop."""

    def __init__(self, engine: "Engine", delay_ms: int, on_output):
        self.engine = engine
        self.id = uuid.uuid4().hex[:16]
        self.delay_ms = delay_ms
        self.on_output = on_output           # called on the event loop with an Output
        self.created = time.monotonic()
        # shared with the worker (engine lock)
        self._pcm: deque[np.ndarray] = deque()
        self._buffered = 0                   # samples in _pcm
        self._final = False
        self._aborted = False
        # worker only
        self.session = None
        self._ended = False
        self._closed = False
        self._tokens_seen = 0
        # event loop only
        self.finished = False                # done or error delivered
        self._room = None                    # asyncio.Event: buffer below MAX_BUFFERED_S

    # ---- event loop side -----------------------------------------------------------------
    def append(self, pcm: np.ndarray) -> None:
        """Queue 16 kHz float32 mono PCM."""
        if pcm.size == 0:
            return
        with self.engine._cond:
            if self._final or self._aborted:
                raise VoxcError("this stream has ended")
            self._pcm.append(pcm)
            self._buffered += pcm.size
            self.engine._cond.notify()

    def end(self) -> None:
        """No more audio: the stream finishes and delivers its final Output."""
        with self.engine._cond:
            self._final = True
            self.engine._cond.notify()

    def abort(self) -> None:
        """Drop the stream (client gone or buffer cleared); its slot is freed by the next tick."""
        with self.engine._cond:
            self._aborted = True
            self.engine._cond.notify()
        self.finished = True

    @property
    def buffered_seconds(self) -> float:
        return self._buffered / 16000

    @property
    def busy(self) -> bool:
        """Audio queued, or an end not yet answered: the client is waiting for the server."""
        return not self.finished and (self._buffered > 0 or self._final)

    async def wait_room(self) -> None:
        """Wait while more than MAX_BUFFERED_S of audio waits for the model (a client sending faster
        than the model runs is slowed down by TCP instead of filling memory)."""
        import asyncio

        while self._buffered > MAX_BUFFERED_S * 16000 and not self.finished:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    def _deliver(self, out: Output) -> None:
        if self._room is not None:
            self._room.set()
        if self.finished and not (out.done or out.error):
            return
        if out.done or out.error:
            if self.finished:
                return
            self.finished = True
        self.on_output(out)


class Engine:
    def __init__(self, model, max_sessions: int):
        if len(model.slots.free) < max_sessions:
            raise VoxcError(f"the model has {len(model.slots.free)} free stream slots, fewer than "
                            f"max_sessions={max_sessions}; load it with voxc.load(..., max_streams={max_sessions})")
        self.model = model
        self.max_sessions = max_sessions
        self.rate = model.config.audio.sampling_rate
        self.spt = model.config.audio.samples_per_token
        self._cond = threading.Condition()
        self._streams: list[Stream] = []     # guarded by _cond
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop = None
        self.leases = 0                      # event loop only
        self.started = time.time()
        self.worker_error: str | None = None
        # metrics (written by the worker, read anywhere: plain counters and deques)
        self.tick_seconds: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.tick_batch: deque[int] = deque(maxlen=LATENCY_WINDOW)
        self._token_log: deque[tuple[float, int]] = deque()
        self.tokens_total = 0
        self.audio_seconds_total = 0.0
        self.ticks_total = 0
        self.sessions_total = 0
        self.refused_total = 0
        self.stream_errors_total = 0
        self.warmup_seconds = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, loop) -> None:
        if self.model.rt.kind not in ("cpu", "llvm"):   # a CPU's first calls cost little; a GPU's do
            self.warm_up()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="voxc-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warm_up(self) -> None:
        """One batched step at every batch size the server can run (1..max_sessions streams), before
        the first client (start() does this on GPUs): the first call of a shape loads its kernels,
        allocates its buffers (and on CUDA captures the one-stream graphs), which cost a GPU server
        0.3-0.9 s steps in its first seconds of load (measured on an H100 with 32-48 sessions joining
        at once).  The streams are dropped afterwards, and the buffers the VM's allocator kept for
        every batch size go back to the device (at 64 sessions they held 70 of an H100's 80 GB, and
        the KV caches then had to wait for a release mid-load: a 0.2 s step); the one-stream step runs
        once more after that, so that its graph capture finds the buffers it needs already pooled."""
        t0 = time.perf_counter()
        silence = np.zeros(self.spt, np.float32)

        def step(batch: int) -> None:
            streams = [self.model.stream() for _ in range(batch)]
            try:
                for s in streams:
                    s.queue(silence)
                advance(streams)
            finally:
                for s in streams:
                    s.drop()

        # largest batch first: the one-stream step, which captures its CUDA graph at its first
        # call, then finds TVM's memory pool already filled by the batched steps (a capture may
        # not allocate; a first-ever lone step crashed an H100 server in that capture)
        for batch in range(self.max_sessions, 0, -1):
            step(batch)
        if self.model.release_cached_memory():
            step(1)
        self.warmup_seconds = time.perf_counter() - t0
        log.info("warm-up: 1..%d streams in %.1f s", self.max_sessions, self.warmup_seconds)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- admission (event loop) ----------------------------------------------------------------
    def try_lease(self) -> bool:
        if self.leases >= self.max_sessions:
            self.refused_total += 1
            return False
        self.leases += 1
        self.sessions_total += 1
        return True

    def release_lease(self) -> None:
        self.leases -= 1

    def open(self, delay_ms: int, on_output) -> Stream:
        """A new stream for a connection that holds a lease (the delay is checked by the caller)."""
        stream = Stream(self, delay_ms, on_output)
        with self._cond:
            self._streams.append(stream)
            self._cond.notify()
        return stream

    # ---- metrics -----------------------------------------------------------------------------
    def active_streams(self) -> int:
        with self._cond:
            return sum(1 for s in self._streams if s.session is not None)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        log_ = list(self._token_log)
        recent = [n for t, n in log_ if now - t <= RATE_WINDOW_S]
        return sum(recent) / RATE_WINDOW_S

    def step_percentiles(self) -> dict[str, float]:
        values = np.array(list(self.tick_seconds), np.float64)
        if values.size == 0:
            return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}

    # ---- the worker ----------------------------------------------------------------------------
    def _has_work(self) -> bool:
        slot_free = bool(self.model.slots.free)   # only this thread changes the slots
        for s in self._streams:
            if s._aborted:
                return True
            if s.session is None and not slot_free:
                continue                          # waits for a slot (freed by another stream's work)
            if s._buffered or (s._final and not s._ended) or s.session is None:
                return True
        return False

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._has_work():
                        self._cond.wait(timeout=1.0)
                    if self._stop:
                        break
                    work = self._take_work()
                self._tick(work)
        except BaseException:   # keep the reason for /health; every stream gets an error
            self.worker_error = traceback.format_exc()
            log.error("voxc engine worker died:\n%s", self.worker_error)
            with self._cond:
                streams, self._streams = self._streams, []
            for s in streams:
                self._post(s, Output(error="the transcription worker stopped; see the server log"))
        finally:
            with self._cond:
                streams, self._streams = self._streams, []
            for s in streams:
                self._release(s)

    def _take_work(self):
        """Under the lock: each stream's audio for this tick and its end/abort marks."""
        budget = TICK_AUDIO_TOKENS * self.spt
        work = []
        for s in list(self._streams):
            if s._aborted:
                self._streams.remove(s)
                work.append((s, None, False, True))
                continue
            chunks, taken = [], 0
            while s._pcm and taken < budget:
                chunk = s._pcm.popleft()
                if taken + chunk.size > budget:
                    s._pcm.appendleft(chunk[budget - taken:])
                    chunk = chunk[:budget - taken]
                chunks.append(chunk)
                taken += chunk.size
            s._buffered -= taken
            end = s._final and not s._pcm and not s._ended
            work.append((s, chunks, end, False))
        return work

    def _tick(self, work) -> None:
        model = self.model
        started = time.perf_counter()
        live = []
        for s, chunks, end, aborted in work:
            if aborted:
                self._release(s)
                continue
            try:
                if end and not chunks and (s.session is None or s.session.samples_fed == 0):
                    self._release(s)           # no audio at all: an empty transcript, nothing to run
                    self._drop(s)
                    self._post(s, Output(done=True, usage={"prompt_tokens": 0, "completion_tokens": 0,
                                                           "total_tokens": 0}))
                    continue
                if s.session is None:
                    if not model.slots.free:    # the slot of a finished/aborted stream comes free next tick
                        with self._cond:
                            for c in reversed(chunks):
                                s._pcm.appendleft(c)
                                s._buffered += c.size
                        continue
                    s.session = model.stream(s.delay_ms)
                for c in chunks:
                    s.session.queue(c)
                    self.audio_seconds_total += c.size / self.rate
                if end:
                    s.session.end()
                    s._ended = True
                live.append(s)
            except Exception as exc:   # a bad stream must not stop the others
                self._fail(s, exc)
        sessions = [s.session for s in live]
        failed = False
        while True:
            try:
                advance([s.session for s in live])
                break
            except KvCacheFull as exc:
                # the streams that got no KV pages end (their pages go back); the others go on: their
                # state is as the last step that ran left it
                short = [s for s in live if s.session is not None and s.session.slot in exc.slots]
                log.warning("%s: %d stream(s) end", exc, len(short))
                for s in short:
                    self._fail(s, exc)
                live = [s for s in live if s not in short]
                if not short:
                    failed = True
                    break
            except Exception as exc:
                failed = True
                log.error("advance failed:\n%s", traceback.format_exc())
                for s in live:
                    self._fail(s, exc)
                break
        elapsed = time.perf_counter() - started
        if failed:
            return
        new_tokens = 0
        for s in live:
            try:
                new_tokens += self._collect(s)
            except Exception as exc:
                self._fail(s, exc)
        self.ticks_total += 1
        self.tokens_total += new_tokens
        now = time.monotonic()
        if sessions:
            self.tick_seconds.append(elapsed)
            self.tick_batch.append(len(sessions))
            self._token_log.append((now, new_tokens))
        while self._token_log and now - self._token_log[0][0] > RATE_WINDOW_S:
            self._token_log.popleft()

    def _collect(self, s: Stream) -> int:
        session = s.session
        duration = session.samples_fed / self.rate
        span = dict(left_pad_tokens=session.left_pad_tokens, delay_tokens=session.delay, duration=duration)
        pieces = [Piece(text, *token_span(q, **span)) for text, q in session.take_pieces()]
        new_tokens = session.token_count - s._tokens_seen
        s._tokens_seen = session.token_count
        if not s._ended:
            if pieces:
                self._post(s, Output(pieces=pieces, duration=duration))
            return new_tokens
        tail = session.finish()          # releases the slot; the text still held back (a broken UTF-8 tail)
        if tail:
            end = pieces[-1].end if pieces else duration
            pieces.append(Piece(tail, end, end))
        usage = {"prompt_tokens": len(session.prompt), "completion_tokens": session.token_count,
                 "total_tokens": len(session.prompt) + session.token_count}
        self._drop(s)
        self._post(s, Output(pieces=pieces, done=True, usage=usage, duration=duration))
        return new_tokens

    def _fail(self, s: Stream, exc: Exception) -> None:
        self.stream_errors_total += 1
        message = str(exc) if isinstance(exc, VoxcError) else f"{type(exc).__name__}: {exc}"
        log.warning("stream %s failed: %s", s.id, message)
        self._release(s)
        self._drop(s)
        self._post(s, Output(error=message))

    def _drop(self, s: Stream) -> None:
        with self._cond:
            if s in self._streams:
                self._streams.remove(s)

    def _release(self, s: Stream) -> None:
        """Free an unfinished stream's slot (client gone, buffer cleared, or a failure)."""
        session, s.session = s.session, None
        if session is not None:
            session.drop()                   # unfinished: no finish() compute

    def _post(self, s: Stream, out: Output) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(s._deliver, out)
        except RuntimeError:    # the loop closed meanwhile (server shutting down)
            pass
