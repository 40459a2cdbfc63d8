"""The multi-stream engine's drivers (a mixin of :class:`~streamedit.engine.multi.MultiStreamEngine`):
``tick()`` runs one batch on the caller's thread, ``start()`` runs them on a thread of its own, pipelined
on CUDA (tick k+1 launched before tick k is handed out; on CPU a launch computes its batch, so it is
handed out at once). A failure no single stream's input explains ends every
stream with the reason (``Stream.fail``), never silently; per-stream failures are handled in ``_launch``."""

from __future__ import annotations

import logging
import threading

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
            self._thread = threading.Thread(target=self._loop, name="streamedit-multistream", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the tick thread after the batch in flight is handed out."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join()
        self._thread = None

    def _work_or_stop(self) -> bool:
        return self._stopping or any(s.pending is not None for s in self._streams)

    def _loop(self) -> None:
        launched = None  # queued on the GPU, not handed out yet
        try:
            while True:
                with self._cond:  # with a batch in flight, do not wait: hand it out
                    if launched is None:
                        self._cond.wait_for(self._work_or_stop)
                    if self._stopping:
                        break
                    picked = self._select()
                nxt = self._launch(*picked) if picked else None
                if launched is not None:
                    self._finish(launched)
                launched = nxt
                if launched is not None and not self.cuda:  # on CPU _launch computed it: nothing to overlap,
                    self._finish(launched)  # and holding it back for the next tick would double its latency
                    launched = None
            if launched is not None:
                self._finish(launched)
        except BaseException as exc:  # noqa: BLE001  (kept for the caller: stop() returns, error says why)
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """A tick failed in work no one stream's input explains (the batch's TE, U-Net, decode, copies):
        the device state is not to be trusted, so every stream ends with the reason (not silently)."""
        log.exception("multi-stream engine: a tick failed; ending every stream", exc_info=exc)
        self.error = exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        for s in self.streams:
            s.fail(f"the shared engine stopped ({type(exc).__name__}: {first})")
