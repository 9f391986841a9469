"""Serving configs, one model per backend: checked before any work (unknown keys, URLs),
fingerprinted as before the split (without URL or key), compared with the key's
fingerprint, the key kept secret in a saved block, and blocks of the old flat shape
still loading."""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_rows, run_cli, write_jsonl
from prefect.blocks.core import Block
from prefect.utilities.dispatch import _TYPE_REGISTRIES
from pydantic import Field, SecretStr

from nightshift.blocks.serving_config import (
    FakeBackendConfig,
    OpenAICompatibleConfig,
    ServingConfig,
    VLLMEngineConfig,
    parse_serving,
)
from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import digest
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


# -- one config per backend ---------------------------------------------------------------


def _spec(tmp_path: Path, serving: dict) -> dict:
    write_jsonl(tmp_path / "a.jsonl", make_rows(3))
    return {
        "name": "cfg",
        "source": {"path": str(tmp_path / "a.jsonl")},
        "store": {"url": f"file://{tmp_path}/store"},
        "steps": [{"generate": {"prompt": "{{ text }}", "output": "o"}}],
        "serving": {"default": serving},
    }


@pytest.mark.parametrize(
    "serving, message",
    [
        (
            {**HTTP, "max_concurency": 64},
            r"serving\.default\.max_concurency: not a setting of backend openai_compatible; "
            r"did you mean max_concurrency\?",
        ),
        (
            {"model": "smollm2", "base_url": "http://h:1/v1"},
            r"serving\.default\.base_url: not a setting of backend vllm "
            r"\(it is a setting of backend openai_compatible\)",
        ),
        (
            {"backend": "fake", "model": "echo", "max_model_len": 512},
            r"serving\.default\.max_model_len: not a setting of backend fake",
        ),
        (
            {"backend": "tgi", "model": "m"},
            r"serving\.default\.backend: 'tgi' is not a backend \(one of: vllm, "
            r"openai_compatible, fake\)",
        ),
        (
            {**HTTP, "base_url": "127.0.0.1:8000/v1"},
            r"serving\.default\.base_url: '127\.0\.0\.1:8000/v1' is not an http:// or https:// "
            r"URL with a host; write http://127\.0\.0\.1:8000/v1",
        ),
        (
            {**HTTP, "base_url": "localhost:8000/v1"},
            r"serving\.default\.base_url: 'localhost:8000/v1' is not an http:// or https:// "
            r"URL with a host; write http://localhost:8000/v1",
        ),
        (
            {**HTTP, "base_url": "ftp://files.example.com/v1"},
            r"serving\.default\.base_url: 'ftp://files\.example\.com/v1' is not an http:// or "
            r"https:// URL with a host",
        ),
        (
            {
                "backend": "openai_compatible",
                "model": "m",
                "base_urls": ["http://a:8000/v1", "localhost:8001/v1"],
            },
            r"serving\.default\.base_urls\[1\]\.url: 'localhost:8001/v1' is not an http://",
        ),
        (
            {
                "backend": "openai_compatible",
                "model": "m",
                "base_urls": ["http://a:8000/v1", {"url": "ftp://b/v1", "max_concurrency": 2}],
            },
            r"serving\.default\.base_urls\[1\]\.url: 'ftp://b/v1' is not an http://",
        ),
        (
            {**HTTP, "base_url": "http://h:port/v1"},
            r"serving\.default\.base_url: 'http://h:port/v1' is not a URL",
        ),
        (
            {"block": "x", "model": "m"},
            r"serving\.default\.model: a saved block is named alone",
        ),
        (  # booleans and strings of digits are not numbers here
            {**HTTP, "max_concurrency": True},
            r"serving\.default\.max_concurrency: expected an integer from 1 to 4096 or auto, "
            r"got true \(a boolean\)",
        ),
        (
            {"model": "smollm2", "max_model_len": "1024"},
            r"serving\.default\.max_model_len: expected an integer, got '1024' \(a string\)",
        ),
        (
            {**HTTP, "timeout_s": False},
            r"serving\.default\.timeout_s: expected a number, got false \(a boolean\)",
        ),
    ],
)
def test_each_backend_refuses_what_is_not_its_own_at_validate(
    tmp_path: Path, serving: dict, message: str
) -> None:
    """Unknown keys (a typo, another backend's setting) and URLs that cannot work are one
    line at validate, naming the key, instead of being ignored or failing at run time."""
    with pytest.raises(SpecError) as caught:
        build_plan(_spec(tmp_path, serving))
    assert re.match(message + "$", str(caught.value)) or re.match(message, str(caught.value)), str(
        caught.value
    )
    assert "\n" not in str(caught.value)


def test_the_command_line_says_it_in_one_line(tmp_path: Path, prefect_api: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path, {**HTTP, "base_url": "localhost:8000/v1"})))
    result = run_cli(["validate", str(path)], prefect_api)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "serving.default.base_url: 'localhost:8000/v1'" in lines[0], lines
    assert "Traceback" not in result.stderr + result.stdout


def test_each_backend_has_its_own_model() -> None:
    assert isinstance(parse_serving({"model": "smollm2"}), VLLMEngineConfig)
    assert isinstance(parse_serving({"backend": "fake", "devices": "0,1"}), FakeBackendConfig)
    http = parse_serving({**HTTP, "base_urls": None})
    assert (
        isinstance(http, OpenAICompatibleConfig) and http.endpoint_list()[0].url == HTTP["base_url"]
    )
    block = ServingConfig(**HTTP, max_concurrency=4)  # flat keywords, as before the split
    assert block.settings == OpenAICompatibleConfig(**{**HTTP, "max_concurrency": 4})
    assert ServingConfig(settings=block.settings).settings == block.settings
    with pytest.raises(ValueError, match="max_concurency"):
        ServingConfig(**HTTP, max_concurency=4)
    assert ServingConfig().settings == VLLMEngineConfig()


def test_configs_differing_only_in_the_key_are_two_and_never_share_a_pool() -> None:
    from nightshift.serving.runner import ServingTaskRunner, shared_pool_for, shared_serving

    a = OpenAICompatibleConfig(**{**HTTP, "api_key": "sk-aaaa"})
    b = OpenAICompatibleConfig(**{**HTTP, "api_key": "sk-bbbb"})
    same = OpenAICompatibleConfig(**{**HTTP, "api_key": "sk-aaaa"})
    assert a.as_dict() == b.as_dict(), "as_dict masks the key"
    assert a != b and a.sharing_key() != b.sharing_key()
    assert a == same and a.sharing_key() == same.sharing_key()
    fingerprint = a.secret_fingerprint()
    assert fingerprint and "sk-aaaa" not in fingerprint + a.sharing_key()
    assert ServingTaskRunner({"default": a}) != ServingTaskRunner({"default": b})
    assert ServingTaskRunner({"default": a}) == ServingTaskRunner({"default": same})
    assert ServingTaskRunner({"default": a}) != ServingTaskRunner({"default": HTTP})
    with shared_serving({"default": a}) as pool:
        assert shared_pool_for({"default": b}) is None, "a pool holding key a served key b"
        assert shared_pool_for({"default": OpenAICompatibleConfig(**HTTP)}) is None
        assert shared_pool_for({"default": same}) is pool
        with ServingTaskRunner({"default": b}) as runner:
            assert runner.pool is not pool
        with ServingTaskRunner({"default": same}) as runner:
            assert runner.pool is pool


#: A spec with one LLM step per backend shape, and the step keys the flat ServingConfig
#: (before the split into one model per backend) gave it: configs written before the split
#: keep their keys (and the answers cached under them).
KEYED_SERVING = {
    "local": {"model": "smollm2", "max_model_len": 1024, "dtype": "float32", "seed": 3},
    "api": {
        "backend": "openai_compatible",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "max_concurrency": 4,
        "extra_body": {"top_k": 20},
        "model_revision": "r2",
    },
    "fleet": {
        "backend": "openai_compatible",
        "model": "m",
        "endpoint": "chat",
        "base_urls": ["http://a:1/v1", {"url": "http://b:1/v1", "max_concurrency": 2}],
    },
    "echo": {"backend": "fake", "model": "echo", "fake_delay_s": 0.01},
}
KEYS_BEFORE_THE_SPLIT = [
    "c572a7209b08c962e7e8855d0ba9f250ceefc862e5b5b8aa79dcb29add930639",
    "a2df0edea1b62dae721c3a2396399d6b48fe9571a4c385c7535dc6bcb4eb9b6e",
    "5bcedc1eb6e58bfcf21dbb03db818ccabb9c1b60dd78dd15a070d3ab197ed87b",
    "214934db4315a2b6ae23a30f238f464539957f11c86540c8f7880db6854768bb",
]


#: What each config contributed to the step keys (``digest(identity())``) before the split.
IDENTITIES_BEFORE_THE_SPLIT = {
    "local": "397f8f81dace5e6b49f0bb875def8c9e0d845adea13e48d71e4b2fb2ba9eddf3",
    "api": "65f17cf9571289bf8e6b911508b5b8656567700e6faa215839e1b50c6ae52d8a",
    "fleet": "c16f43b2920ad5bb8695c9686e7e7e91f23f1a51cd088050d5162897d11b4b28",
    "echo": "cdde710e3a8bdab6f6e5afec30abc9473b5dc0fd75a80a7b49b56329599b89ca",
}


def test_step_keys_are_those_of_the_flat_config(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", make_rows(3))
    spec = {
        "name": "keys",
        "source": {"path": str(tmp_path / "a.jsonl")},
        "store": {"url": f"file://{tmp_path}/store"},
        "fuse": False,
        "steps": [
            {"generate": {"prompt": "{{ text }}", "output": out, "serving": name}}
            for out, name in zip("abcd", KEYED_SERVING, strict=True)
        ],
        "serving": KEYED_SERVING,
    }
    plan = build_plan(spec)
    assert {
        name: digest(config.identity()) for name, config in plan.serving.items()
    } == IDENTITIES_BEFORE_THE_SPLIT, "a serving config's contribution to the keys changed"
    # and so the whole keys (these also change if Generate's own code changes)
    assert [s.fingerprint for s in plan.stages] == KEYS_BEFORE_THE_SPLIT


@pytest.fixture
def flat_block() -> Iterator[type[Block]]:
    """The block as it was saved before the split: one flat model for every backend
    (Prefect's registry of block classes by slug is given back to ServingConfig after)."""
    registry = _TYPE_REGISTRIES[Block]
    current = registry[ServingConfig.get_block_type_slug()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "... has key 'nightshift-llm-serving' that matches"

        class FlatServingConfig(Block):
            """The block as it was saved before the split: one flat model for every backend."""

            _block_type_name = "Nightshift LLM Serving"
            _block_type_slug = "nightshift-llm-serving"

            backend: str = "vllm"
            model: str = "smollm2"
            devices: str | None = None
            tensor_parallel_size: int = 1
            dtype: str = "auto"
            max_model_len: int = 2048
            gpu_memory_utilization: float = 0.9
            max_num_seqs: int = 256
            quantization: str | None = None
            seed: int = 0
            enforce_eager: bool | None = None
            kv_cache_memory_bytes: int | None = None
            max_batch: int = 256
            batch_timeout_s: float = 0.02
            max_restarts: int = 10
            stall_timeout_s: float = 300.0
            fake_delay_s: float = 0.0
            base_url: str | None = None
            base_urls: list[dict] | None = None
            stream: bool = True
            api_key: SecretStr | None = None
            api_key_secret: str | None = None
            api_key_env: str | None = None
            api_key_header: str = "Authorization"
            headers: dict[str, str] = Field(default_factory=dict)
            endpoint: str = "auto"
            max_concurrency: int = 16
            requests_per_minute: float | None = None
            tokens_per_minute: float | None = None
            timeout_s: float = 120.0
            max_attempts: int = 8
            backoff_initial_s: float = 0.5
            backoff_max_s: float = 60.0
            outage_after_s: float = 120.0
            global_limit: str | None = None
            global_limit_mode: str = "concurrency"
            slot_hold_s: float = 10.0
            price: dict | None = None
            extra_body: dict = Field(default_factory=dict)
            cache_answers: bool | None = None
            model_revision: str | None = None

    try:
        yield FlatServingConfig
    finally:
        registry[ServingConfig.get_block_type_slug()] = current


def test_blocks_saved_in_the_flat_shape_still_load(tmp_path: Path, flat_block: type[Block]) -> None:
    FlatServingConfig: Any = flat_block
    tag = uuid.uuid4().hex[:8]
    FlatServingConfig(**HTTP, api_key="sk-old-secret", max_concurrency=3).save(f"old-http-{tag}")
    FlatServingConfig(model="smollm2", max_model_len=1024).save(f"old-vllm-{tag}")
    loaded = ServingConfig.load(f"old-http-{tag}")
    assert loaded.settings == OpenAICompatibleConfig(
        **{**HTTP, "api_key": "sk-old-secret", "max_concurrency": 3}
    )
    assert loaded.resolve_api_key() == "sk-old-secret"
    serving = {
        "default": {"block": f"old-vllm-{tag}"},
        "api": {"block": f"old-http-{tag}"},
    }
    spec = {**_spec(tmp_path, {}), "serving": serving}
    spec["steps"].append({"generate": {"prompt": "{{ text }}", "output": "p", "serving": "api"}})
    plan = build_plan(spec)
    assert plan.serving["default"] == VLLMEngineConfig(model="smollm2", max_model_len=1024)
    # one that set another backend's field cannot be read as one backend: one line, how to fix
    FlatServingConfig(model="smollm2", max_concurrency=64).save(f"old-mixed-{tag}")
    spec["serving"] = {"default": {"block": f"old-mixed-{tag}"}}
    with pytest.raises(SpecError) as caught:
        build_plan(spec)
    message = str(caught.value)
    assert message.startswith(
        f"serving.default.block 'old-mixed-{tag}': the saved Nightshift LLM Serving block no "
        "longer loads (max_concurrency: not a setting of backend vllm (it is a setting of "
        "backend openai_compatible)); save it "
        f"again in the current shape: ServingConfig(...).save('old-mixed-{tag}', overwrite=True)"
    ), message
    assert "\n" not in message
