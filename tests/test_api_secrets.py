"""API keys from a serving block (SecretStr), a Prefect Secret block or the environment:
sent to the server, never in logs, artifacts, run parameters or the step store."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from conftest import make_rows, write_jsonl
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from nightshift.blocks.serving_config import ServingConfig
from nightshift.core.errors import NightshiftError
from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Generate

pytest_plugins = ["api_fixtures"]


class Records(logging.Handler):
    """Every log record of this process, at every level (httpx's and Prefect's included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def all_logs():
    root, handler = logging.getLogger(), Records()
    loggers = [
        root,
        *(logging.getLogger(n) for n in ("prefect", "nightshift", "httpx", "httpcore")),
    ]
    levels = [logger.level for logger in loggers]
    root.addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def test_api_keys_are_used_and_never_shown(
    tmp_path: Path, fault_proxy, monkeypatch, all_logs
) -> None:
    key = f"sk-nightshift-{uuid.uuid4().hex}"
    fault_proxy.configure(require_key=key)
    http = {
        "backend": "openai_compatible",
        "base_url": fault_proxy.base_url,
        "model": "smollm2",
        "max_concurrency": 4,
    }
    tag = uuid.uuid4().hex[:8]
    ServingConfig(**http, api_key=key).save(f"api-{tag}", overwrite=True)
    Secret(value=key).save(f"key-{tag}", overwrite=True)
    monkeypatch.setenv("NIGHTSHIFT_TEST_KEY", key)
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(12, "s"))
    steps = [
        Generate(
            prompt="{{ text }} is", output=f"from_{name}", serving=name, chat=False, max_tokens=3
        )
        for name in ("block", "secret", "env")
    ]
    pipe = Pipeline(
        "api-secrets",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=steps,
        store=f"file://{tmp_path}/store",
        batch_size=6,
        serving={
            "block": {"block": f"api-{tag}"},
            "secret": {**http, "api_key_secret": f"key-{tag}"},
            "env": {**http, "api_key_env": "NIGHTSHIFT_TEST_KEY"},
        },
    )
    summary = pipe.run()
    out = pipe.read()
    for name in ("block", "secret", "env"):
        assert (
            out[f"from_{name}_error"].null_count() == 12 and out[f"from_{name}"].null_count() == 0
        )
    assert fault_proxy.stats()["unauthorized"] == 0

    flow_run_id = summary["flow_run_id"]
    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    shown = [
        repr(flow_run.parameters),
        *(repr(t.task_inputs) + repr(t.name) for t in task_runs),
        *(log.message for log in logs),
        *(repr(a.data) + repr(a.description) for a in found),
    ]
    shown += all_logs.messages
    assert len(task_runs) == 6 and found and len(all_logs.messages) > 100
    assert not [text for text in shown if key in text]
    stored = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in stored)
    assert not [p for p in stored if key.encode() in p.read_bytes()]


def test_a_missing_key_source_is_one_clear_line(tmp_path: Path, fault_proxy) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(3, "m"))
    pipe = Pipeline(
        "api-nokey",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[Generate(prompt="{{ text }}", output="a", max_tokens=2)],
        store=f"file://{tmp_path}/store",
        batch_size=3,
        serving={
            "default": {
                "backend": "openai_compatible",
                "base_url": fault_proxy.base_url,
                "model": "smollm2",
                "api_key_env": "NIGHTSHIFT_NO_SUCH_VAR",
            }
        },
    )
    with pytest.raises(
        NightshiftError,
        match=r"api_key_env NIGHTSHIFT_NO_SUCH_VAR: the environment "
        r"variable is not set",
    ):
        pipe.run()
    assert fault_proxy.stats()["received"] == 0


def test_the_key_is_in_no_repr_dump_or_comparison_value() -> None:
    """What a config shows of itself (reprs, dumps, the sharing key, the block as Prefect's
    UI reads it) never holds the key; two keys still tell the configs apart."""
    from nightshift.blocks.serving_config import OpenAICompatibleConfig, parse_serving
    from nightshift.serving.pool import ServingPool
    from nightshift.serving.runner import ServingTaskRunner

    key = f"sk-nightshift-{uuid.uuid4().hex}"
    http = {"backend": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    config = parse_serving({**http, "api_key": key})
    assert isinstance(config, OpenAICompatibleConfig) and config.resolve_api_key() == key
    block = ServingConfig(**http, api_key=key)
    name = f"secret-repr-{uuid.uuid4().hex[:8]}"
    block.save(name)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            name, block_type_slug=ServingConfig.get_block_type_slug(), include_secrets=False
        )
    runner = ServingTaskRunner({"default": config})
    pool = ServingPool({"default": config})
    shown = [
        repr(config),
        str(config),
        repr(block),
        str(block),
        config.model_dump_json(),
        block.model_dump_json(),
        repr(config.as_dict()),
        config.sharing_key(),
        str(config.secret_fingerprint()),
        config.key(),
        repr(config.identity()),
        repr(config.http_options()),
        repr(document.data),
        repr(runner.serving),
        repr(pool.configs),
    ]
    assert not [text for text in shown if key in text]
    other = parse_serving({**http, "api_key": key + "x"})
    assert other.sharing_key() != config.sharing_key()
    assert ServingConfig.load(name).settings == config  # the saved key is the key
