"""The HTTP serving config: checked before any work, fingerprinted without URL or key,
and its key kept secret in a saved block."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from conftest import make_rows, write_jsonl

from nightshift.blocks.serving_config import ServingConfig
from nightshift.core.errors import SpecError
from nightshift.flows.plan import build_plan

HTTP = {"backend": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "model": "m"}


def test_a_missing_base_url_stops_before_any_work(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", make_rows(3))
    spec = {
        "name": "cfg",
        "source": {"path": str(tmp_path / "a.jsonl")},
        "store": {"url": f"file://{tmp_path}/store"},
        "steps": [{"generate": {"prompt": "{{ text }}", "output": "o"}}],
        "serving": {"default": {"backend": "openai_compatible", "model": "m"}},
    }
    with pytest.raises(
        SpecError, match=r"^serving\.default: .*backend openai_compatible needs base_url"
    ):
        build_plan(spec)
    spec["serving"]["default"]["max_concurrency"] = 0
    spec["serving"]["default"]["base_url"] = "http://x/v1"
    with pytest.raises(SpecError, match=r"^serving\.default\.max_concurrency: "):
        build_plan(spec)


def test_fingerprint_identity_has_the_model_not_the_host_or_key() -> None:
    a = ServingConfig(**HTTP, api_key="sk-a", max_concurrency=4)
    b = ServingConfig(
        **{**HTTP, "base_url": "http://other:8000/v1"}, api_key="sk-b", max_concurrency=64
    )
    assert a.identity() == b.identity(), "another host or key serving the same model reuses outputs"
    assert ServingConfig(**{**HTTP, "model": "n"}).identity() != a.identity()
    assert ServingConfig(**HTTP, model_revision="2").identity() != a.identity()
    assert "sk-a" not in repr(a.identity()) + a.key() + a.model_dump_json() + repr(a)


def test_a_saved_block_keeps_the_key_secret() -> None:
    name = f"cfg-{uuid.uuid4().hex[:8]}"
    ServingConfig(**HTTP, api_key="sk-saved-secret").save(name)
    loaded = ServingConfig.load(name)
    assert loaded.resolve_api_key() == "sk-saved-secret"
    assert "sk-saved-secret" not in loaded.model_dump_json() + repr(loaded)
    assert (
        loaded.http_options()["base_url"] == HTTP["base_url"]
        and "api_key" not in loaded.http_options()
    )


def test_a_key_that_cannot_be_found_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "a.jsonl", make_rows(3))
    monkeypatch.delenv("NIGHTSHIFT_TEST_UNSET_KEY", raising=False)
    spec = {
        "name": "cfg",
        "source": {"path": str(tmp_path / "a.jsonl")},
        "store": {"url": f"file://{tmp_path}/store"},
        "steps": [{"generate": {"prompt": "{{ text }}", "output": "o"}}],
        "serving": {"default": {**HTTP, "api_key_env": "NIGHTSHIFT_TEST_UNSET_KEY"}},
    }
    with pytest.raises(
        SpecError,
        match=r"^serving\.default: api_key_env NIGHTSHIFT_TEST_UNSET_KEY: "
        r"the environment variable is not set$",
    ):
        build_plan(spec)
    spec["serving"]["default"] = {**HTTP, "api_key_secret": f"missing-{uuid.uuid4().hex[:8]}"}
    with pytest.raises(
        SpecError,
        match=r"^serving\.default: api_key_secret 'missing-[0-9a-f]+': no such Secret block "
        r"\(.*\); create it first \(see README, 'Blocks'\)$",
    ):
        build_plan(spec)
    assert not (tmp_path / "store" / "cfg" / "steps").exists()
    monkeypatch.setenv("NIGHTSHIFT_TEST_UNSET_KEY", "sk-now-set")
    spec["serving"]["default"] = {**HTTP, "api_key_env": "NIGHTSHIFT_TEST_UNSET_KEY"}
    assert build_plan(spec).serving["default"].api_key_env == "NIGHTSHIFT_TEST_UNSET_KEY"
