"""Bounded per-session memory for the app: sessions that closed or went idle give everything back.

Gradio keeps, per browser session, its state values *and* a copy of every component's config, and drops a
session only when 10,000 of them exist -- a public app's memory then grows with every visitor. The
:class:`SessionReaper` removes a session when its page unloads and, for clients that never say goodbye (API
clients, killed tabs), once it has been idle for ``ttl`` seconds; then it returns freed heap pages to the OS.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import threading
from typing import Any, Optional

__all__ = ['SessionReaper']


def _release_heap() -> None:
    """Collect garbage and ask glibc to return free heap pages (RSS otherwise stays at its high-water mark)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class SessionReaper:
    """Drops gradio sessions on unload and after ``ttl`` idle seconds, checking every ``interval`` seconds."""

    def __init__(self, blocks: Any, ttl: float = 1800.0, interval: float = 10.0) -> None:
        self.blocks, self.ttl, self.interval = blocks, float(ttl), float(interval)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _holder(self) -> Any:
        return getattr(self.blocks, 'state_holder', None)

    def sessions(self) -> int:
        holder = self._holder()
        return len(getattr(holder, 'session_data', ())) if holder is not None else 0

    def drop(self, session_hash: Optional[str]) -> bool:
        """Forget one session: its state values (their delete callbacks run) and gradio's copy of its config."""
        holder = self._holder()
        if holder is None or not session_hash or session_hash not in holder.session_data:
            return False
        holder.delete_state(session_hash)
        with holder.lock:
            holder.session_data.pop(session_hash, None)
            holder.time_last_used.pop(session_hash, None)
        return True

    def reap(self, now: Optional[datetime.datetime] = None) -> int:
        """Drop every session idle for more than ``ttl`` seconds; returns how many."""
        holder = self._holder()
        if holder is None:
            return 0
        now = now or datetime.datetime.now()
        idle = [s for s, used in list(holder.time_last_used.items()) if (now - used).total_seconds() > self.ttl]
        dropped = sum(self.drop(s) for s in idle)
        if dropped:
            _release_heap()
        return dropped

    def on_unload(self, request: Any) -> None:
        """For ``demo.unload``: the page closed, so its session goes now."""
        if self.drop(getattr(request, 'session_hash', None)):
            _release_heap()

    def start(self) -> 'SessionReaper':
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name='gqa-lens-session-reaper', daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reap()
            except Exception:  # never let housekeeping kill the thread; the next round retries
                pass
