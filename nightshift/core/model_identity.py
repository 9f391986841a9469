"""A model's identity without starting an engine: weights and chat template hashes.

Used in step fingerprints: a different model, other weights or another chat template
give other cache keys, so generation recomputes instead of reusing stale text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nightshift.core.embedded_model import resolve_model


def _chat_template(folder: Path) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template") or ""
        return template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return ""


def model_identity(model: str) -> dict[str, Any]:
    """``{model, weights, chat_template_sha256}`` for a local folder, the alias or a hub id."""
    path = resolve_model(model)
    folder = Path(path).expanduser()
    if model.startswith(("/", "./", "../", "~")) and not folder.is_dir():
        raise FileNotFoundError(
            f"model {model}: no such folder (a local model is a folder with config.json and "
            "the weights; or give a hub id, or smollm2 for the embedded model)"
        )
    if not folder.is_dir():  # a hub id: its name is all we know before loading it
        return {"model": model, "weights": None, "chat_template_sha256": None}
    weights = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        weights.update(config.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"}:
            weights.update(f"{f.name}:{f.stat().st_size}\n".encode())
    template = hashlib.sha256(_chat_template(folder).encode()).hexdigest()[:16]
    return {"model": model, "weights": weights.hexdigest()[:16], "chat_template_sha256": template}
