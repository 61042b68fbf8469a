"""Files the app hands to the browser, each at its own path, deleted once they are old.

Gradio caches a returned image array under a path named by the hash of its bytes and rewrites that file on
every call, so two sessions returning the same picture race on one file (one may read it empty). Files
written here get a fresh name each; gradio copies a file path into its cache atomically. A sweep on every
write (and at exit) deletes files older than ``ttl`` seconds, so the folder never grows with traffic.
"""
from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

__all__ = ['ExpiringFiles']


class ExpiringFiles:
    """A private temporary folder of uniquely named files that expire ``ttl`` seconds after being written."""

    def __init__(self, prefix: str = 'gqa-lens-', ttl: float = 900.0, root: Optional[str] = None) -> None:
        self.prefix, self.root, self.ttl = prefix, root, float(ttl)
        self._folder: Optional[Path] = None  # made on the first write: an app that is only built makes no folder
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.root))
                atexit.register(self.close)
            return self._folder

    def new_path(self, suffix: str) -> Path:
        """A fresh path in the folder (after sweeping expired files)."""
        self.sweep()
        return self.folder / f'{uuid.uuid4().hex}{suffix}'

    def write_png(self, array: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format='PNG', compress_level=1)  # speed over a few KB
        return self.write_bytes(buf.getvalue(), '.png')

    def write_bytes(self, data: bytes, suffix: str) -> str:
        path = self.new_path(suffix)
        staging = path.with_name('.' + path.name)
        staging.write_bytes(data)
        os.replace(staging, path)  # readers never see a partial file
        return str(path)

    def sweep(self, now: Optional[float] = None) -> int:
        """Delete files older than ``ttl``; returns how many were deleted."""
        now = time.time() if now is None else now
        removed = 0
        folder = self._folder
        if folder is None:
            return 0
        with self._lock:
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                return 0
            for entry in os.scandir(folder):
                try:
                    if now - entry.stat().st_mtime > self.ttl:
                        if entry.is_dir():
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def count(self) -> int:
        folder = self._folder
        return sum(1 for _ in os.scandir(folder)) if folder is not None and folder.is_dir() else 0

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
