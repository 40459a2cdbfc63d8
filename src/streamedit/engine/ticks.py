"""The multi-stream engine's drivers (a mixin of :class:`~streamedit.engine.multi.MultiStreamEngine`):
``tick()`` runs one batch on the caller's thread, ``start()`` runs them on a thread of its own. On CUDA
(``pipelined``) that thread only launches, and a second one hands each batch out when its outputs are on
the host, so tick k+1 is queued while tick k runs and no output waits for the next launch; at most two
batches are launched and not yet handed out. On CPU a launch computes its batch, so it is handed out at
once. A failure no single stream's input explains ends every stream with the reason (``Stream.fail``),
never silently; per-stream failures are handled in ``_launch``."""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..errors import StreameditError

log = logging.getLogger("streamedit.engine.multi")


class TickDriver:
    """``tick``/``start``/``stop`` over the engine's ``_select``, ``_launch`` and ``_finish``."""

    def tick(self) -> int:
        """Run one batch now (not while :meth:`start`'s thread runs); returns its number of streams."""
        self._check_open()
        if self._thread is not None:
            raise StreameditError("tick() while the engine's thread runs: use one or the other")
        with self._cond:
            picked = self._select()
        if picked is None:
            return 0
        try:
            tick = self._launch(*picked)
            if tick is not None:
                self._finish(tick)
        except BaseException as exc:
            self._fail_all(exc)
            raise
        return len(tick.real) if tick is not None else 0

    def start(self) -> None:
        """Run ticks on a thread whenever a frame is pending (idle otherwise)."""
        self._check_open()
        if self._thread is None:
            self._stopping, self.error = False, None
            self._handout = queue.Queue() if self.pipelined else None
            self._slots = threading.Semaphore(2)  # pipelined: batches launched and not handed out yet
            self._thread = threading.Thread(target=self._loop, name="streamedit-multistream", daemon=True)
            self._thread.start()
            if self._handout is not None:
                self._finisher = threading.Thread(target=self._handout_loop, name="streamedit-multistream-out",
                                                  daemon=True)
                self._finisher.start()

    def stop(self) -> None:
        """Stop the tick thread after the batch in flight is handed out."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join()
        if self._handout is not None:  # the tick thread's last act was to tell it to end
            self._finisher.join()
            self._handout = self._finisher = None
        self._thread = None

    def _work_or_stop(self) -> bool:
        return self._stopping or self.error is not None or any(s.pending is not None for s in self._streams)

    def _full_or_stop(self) -> bool:
        """Every open stream of the next batch's working size has a frame (up to the largest bucket; a stream
        that never sent one has no working size yet and is not waited for)."""
        if self._stopping or self.error is not None:
            return True
        shape, ready = self._next_group()
        return bool(ready) and len(ready) >= min(sum(s.shape == shape for s in self._streams), self.buckets[-1])

    def _hold_s(self, launched) -> float:
        """How long the next launch may wait for more streams' frames with ``launched`` in flight: until that
        batch is due to end (its bucket's measured time, from when the device could start it) less the host's
        time to queue a batch, so the device does not idle. Why: launched the moment any frame was ready, the
        ticks of 2 streams x 30 fps on an H100 served one stream in 209 of 719 (2026-12-07), and a batch of
        1 costs 43 % of a batch of 4 (512², 14.6 vs 33.8 ms) for a quarter of the frames. 0 without
        measured batch times (then: launch as soon as any frame is ready)."""
        times = self.batch_seconds.get(launched.group.shape)
        if not times:
            return 0.0
        start = max(launched.record.t_launch, self._last_done)
        return start + times[len(launched.rows)] - self._launch_s - time.perf_counter()

    def _loop(self) -> None:
        launched = None  # the last batch queued; in flight until handed out (its t_done set)
        try:
            while True:
                if self._handout is not None:
                    self._slots.acquire()  # before taking frames: two batches in flight at most
                with self._cond:
                    if launched is None or launched.record.t_done is not None:
                        self._cond.wait_for(self._work_or_stop)
                    else:  # the device is busy with it: gather a fuller batch until it is nearly done,
                        self._cond.wait_for(self._full_or_stop, timeout=max(0.0, self._hold_s(launched)))
                        self._cond.wait_for(self._work_or_stop)  # then take what comes (never spin)
                    if self._stopping or self.error is not None:
                        break
                    picked = self._select()
                tick = self._launch(*picked) if picked else None
                if tick is None:
                    if self._handout is not None:
                        self._slots.release()
                    continue
                if self._handout is None:  # on CPU _launch computed it: nothing to overlap
                    self._finish(tick)
                else:
                    self._handout.put(tick)  # its slot is released when it has been handed out
                launched = tick
        except BaseException as exc:  # noqa: BLE001  (kept for the caller: stop() returns, error says why)
            self._fail_all(exc)
        finally:
            if self._handout is not None:
                self._handout.put(None)

    def _handout_loop(self) -> None:
        """The pipelined hand-out (start()): each launched batch's outputs to their streams, in launch order.
        After a failure the rest are only taken off the queue, so the tick thread never waits for a slot."""
        while (tick := self._handout.get()) is not None:
            try:
                if self.error is None:
                    self._finish(tick)
            except BaseException as exc:  # noqa: BLE001
                self._fail_all(exc)
                with self._cond:
                    self._cond.notify_all()  # the tick thread sees the error and stops
            finally:
                self._slots.release()

    def _fail_all(self, exc: BaseException) -> None:
        """A tick failed in work no one stream's input explains (the batch's TE, U-Net, decode, copies):
        the device state is not to be trusted, so every stream ends with the reason (not silently)."""
        log.exception("multi-stream engine: a tick failed; ending every stream", exc_info=exc)
        self.error = exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        for s in self.streams:
            s.fail(f"the shared engine stopped ({type(exc).__name__}: {first})")
