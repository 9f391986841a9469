"""A file lock manager that survives killed processes.

Prefect's ``FileSystemLockManager`` keeps a lock until its holder releases it; a flow
process killed with SIGKILL never does, and the next run would wait forever on that
batch. This subclass also records the host and process id of the holder in the lock
file; a lock held by a process of this machine that no longer exists is stale: it is
removed and the waiter proceeds (the batch's output is then recomputed or found whole).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

from prefect.locking.filesystem import FileSystemLockManager


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcessAwareLockManager(FileSystemLockManager):
    """``FileSystemLockManager`` that breaks locks held by dead local processes."""

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: Optional[float] = None,
        hold_timeout: Optional[float] = None,
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            path = self._lock_path_for_key(key)
            info = json.loads(path.read_bytes())
            info.update(host=socket.gethostname(), pid=os.getpid())
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
        return acquired

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        try:
            locked = super().is_locked(key, use_cache=use_cache)
        except ValueError:  # the lock file is being written right now
            return True
        if not locked:
            return False
        path = self._lock_path_for_key(key)
        try:
            info = json.loads(Path(path).read_bytes())
        except (OSError, ValueError):
            return True
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            Path(path).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True
