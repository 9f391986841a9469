"""The step store's lock manager: locks die with their (SIGKILLed) holder process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT

from nightshift.core.locks import UNREADABLE_LOCK_GRACE_S, ProcessAwareLockManager

HOLD = """
import sys, time
from pathlib import Path
from nightshift.core.locks import ProcessAwareLockManager
assert ProcessAwareLockManager(Path(sys.argv[1])).acquire_lock("k", holder="child")
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_process_is_broken(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        manager = ProcessAwareLockManager(tmp_path)
        assert manager.is_locked("k")
        assert not manager.acquire_lock("k", holder="me", acquire_timeout=0.3), (
            "a live holder's lock must be respected"
        )
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    started = time.monotonic()
    assert manager.acquire_lock("k", holder="me", acquire_timeout=10)
    assert time.monotonic() - started < 5
    assert manager.is_lock_holder("k", "me")
    manager.release_lock("k", "me")
    assert not manager.is_locked("k")


def test_unreadable_lock_is_trusted_then_broken(tmp_path: Path) -> None:
    manager = ProcessAwareLockManager(tmp_path)
    lock = tmp_path / "k.lock"
    lock.write_bytes(b"")  # what a kill inside Prefect's own acquire_lock leaves
    assert manager.is_locked("k")
    old = time.time() - UNREADABLE_LOCK_GRACE_S - 1
    os.utime(lock, (old, old))
    assert not manager.is_locked("k")
    assert manager.acquire_lock("k", holder="me", acquire_timeout=1)


def test_one_holder_at_a_time_across_threads(tmp_path: Path) -> None:
    manager = ProcessAwareLockManager(tmp_path)
    inside, peak, lock = [0], [0], threading.Lock()

    def work(name: str) -> None:
        for _ in range(20):
            assert manager.acquire_lock("k", holder=name, acquire_timeout=30)
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.001)
            with lock:
                inside[0] -= 1
            manager.release_lock("k", name)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert peak[0] == 1
    assert not list(tmp_path.glob("*.tmp"))
