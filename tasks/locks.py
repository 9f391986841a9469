"""A file lock manager that survives killed processes.

Prefect's ``FileSystemLockManager`` keeps a lock until its holder releases it; a flow
process killed with SIGKILL never does, and the next run would wait forever on that
batch. Prefect names a holder ``hostname:pid:thread...``, so a lock whose holder is a
process of this machine that no longer exists is stale: it is removed and the waiter
proceeds (the batch's output is then recomputed or found complete).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

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

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        try:
            locked = super().is_locked(key, use_cache=use_cache)
        except ValueError:  # the lock file is being written right now
            return True
        if not locked:
            return False
        info = self._get_lock_info(key, use_cache=True)
        holder = str(info.get("holder", "")) if info else ""
        host, _, rest = holder.partition(":")
        pid_text = rest.split(":", 1)[0]
        if host == socket.gethostname() and pid_text.isdigit() and not _alive(int(pid_text)):
            Path(info["path"]).unlink(missing_ok=True)  # type: ignore[index]
            self._locks.pop(key, None)
            return False
        return True
