"""A file lock manager that survives killed processes.

Prefect's ``FileSystemLockManager`` keeps a lock until its holder releases it; a flow
process killed with SIGKILL never does, and the next run would wait forever on that
batch. This subclass writes each lock file whole, in one atomic step, with the host
and process id of its holder (Prefect's own creates the file empty and fills it
afterwards: a kill in between leaves a lock nobody owns). A lock held by a process of
this machine that no longer exists is stale: it is removed and the waiter proceeds
(the batch's output is then recomputed or found whole).

A lock is first written to ``<key>.lock.<host>-<pid>-<thread>.tmp`` and linked into
place; a waiter killed while it waits leaves that file behind, and :meth:`sweep` removes
those whose process is gone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from pathlib import Path

import anyio
from prefect.locking.filesystem import FileSystemLockManager

from nightshift.core import file_io

#: A lock file that cannot be read (not one of ours) is trusted for this long.
UNREADABLE_LOCK_GRACE_S = 30.0

_HOST = file_io.host_tag()


class ProcessAwareLockManager(FileSystemLockManager):
    """``FileSystemLockManager`` whose locks name their process and die with it."""

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        path = Path(self._lock_path_for_key(key))
        expiration = (
            dt.datetime.now(dt.UTC) + dt.timedelta(seconds=hold_timeout)
            if hold_timeout is not None
            else None
        )
        info = {
            "holder": holder,
            "expiration": str(expiration) if expiration is not None else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        tmp = path.with_name(f"{path.name}.{_HOST}-{os.getpid()}-{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(info))
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        try:
            while True:
                try:
                    os.link(tmp, path)  # atomic, and fails if the lock exists
                    break
                except FileExistsError:
                    if self.is_lock_holder(key, holder):
                        os.replace(tmp, path)  # re-acquired by its holder: new expiry
                        break
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                if remaining == 0 or not self.wait_for_lock(key, remaining):
                    return False
        finally:
            tmp.unlink(missing_ok=True)
        self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
        return True

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return await anyio.to_thread.run_sync(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        try:
            locked = super().is_locked(key, use_cache=use_cache)
        except (ValueError, FileNotFoundError):  # not ours, or removed while reading
            return self._unreadable_lock_held(key, path)
        if not locked:
            return False
        try:
            info = json.loads(path.read_bytes())
        except FileNotFoundError:
            self._locks.pop(key, None)
            return False
        except (OSError, ValueError):
            return self._unreadable_lock_held(key, path)
        pid = info.get("pid")
        if (
            info.get("host") == socket.gethostname()
            and isinstance(pid, int)
            and not file_io.process_alive(pid)
        ):
            self._break(key, path)
            return False
        return True

    def sweep(self) -> int:
        """Remove the lock files' temporary copies that killed waiters left (their process
        on this machine is gone, or they are older than ``file_io.TEMP_SAFE_AGE_S``)."""
        removed = 0
        try:
            entries = list(os.scandir(self.lock_files_directory))
        except FileNotFoundError:
            return 0
        now = time.time()
        for entry in entries:
            if not entry.name.endswith(".tmp"):
                continue
            host, _, rest = entry.name.removesuffix(".tmp").rpartition(".")[2].partition("-")
            pid = rest.partition("-")[0]
            try:
                if host == _HOST and pid.isdigit():
                    stale = not file_io.process_alive(int(pid))
                else:
                    stale = now - entry.stat().st_mtime > file_io.TEMP_SAFE_AGE_S
                if stale:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _unreadable_lock_held(self, key: str, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if age < UNREADABLE_LOCK_GRACE_S:
            return True
        self._break(key, path)
        return False

    def _break(self, key: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._locks.pop(key, None)
