"""Serving configuration from a YAML spec and from a saved Prefect block reaches the
engine: devices (one replica per device), tensor_parallel_size and every engine option.

No model is loaded: the vLLM engine class is replaced by a recorder of its keyword
arguments (the one place VLLMBackend builds the engine); device replicas run the fake
backend in real child processes through the same serving interface.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import make_rows, write_jsonl

from nightshift.blocks.serving_config import ServingConfig
from nightshift.flows.outputs import read_output
from nightshift.flows.plan import build_plan
from nightshift.flows.run_pipeline import run_pipeline
from nightshift.serving.pool import ServingPool
from nightshift.serving.runner import shared_serving

pytest.importorskip("torch", reason="VLLMBackend needs torch (installed with vllm)")

OPTIONS = {
    "dtype": "bfloat16",
    "max_model_len": 777,
    "gpu_memory_utilization": 0.5,
    "max_num_seqs": 7,
    "quantization": "fp8",
    "seed": 11,
    "enforce_eager": False,
    "tensor_parallel_size": 2,
    "kv_cache_memory_bytes": 12345,
}


class Recorded(Exception):
    """Raised by the recording engine instead of loading a model."""


@pytest.fixture()
def engine_kwargs(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in ``vllm`` module whose ``LLM`` records its kwargs and stops."""
    calls: list[dict] = []

    def llm(**kwargs: object) -> None:
        calls.append(kwargs)
        raise Recorded()

    fake = types.ModuleType("vllm")
    fake.LLM = llm  # type: ignore[attr-defined]
    fake.__version__ = "recorder"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    return calls


def model_folder(tmp_path: Path) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return str(folder)


def spec_with(tmp_path: Path, serving: dict) -> dict:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(6, "c"))
    return {
        "name": "cfg",
        "source": {"path": str(tmp_path / "data" / "a.jsonl")},
        "store": {"url": f"file://{tmp_path}/store"},
        "serving": serving,
        "steps": [{"generate": {"prompt": "{{ text }}", "output": "out"}}],
    }


def engine_options_of(spec: dict | Path, engine_kwargs: list[dict]) -> dict:
    plan = build_plan(spec)
    pool = ServingPool(plan.serving)
    with pytest.raises(Recorded):
        pool.served("default")  # builds the backend: VLLMBackend -> vllm.LLM(**kwargs)
    pool.close()
    return engine_kwargs.pop()


def test_engine_options_from_yaml_reach_the_engine(
    tmp_path: Path, engine_kwargs: list[dict]
) -> None:
    model = model_folder(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_with(tmp_path, {"default": {"model": model, **OPTIONS}})))
    got = engine_options_of(path, engine_kwargs)
    assert got == {"model": model, **OPTIONS}


def test_engine_options_from_a_saved_block_reach_the_engine(
    tmp_path: Path, engine_kwargs: list[dict]
) -> None:
    model = model_folder(tmp_path)
    ServingConfig(model=model, **OPTIONS).save("gen-config-test", overwrite=True)
    got = engine_options_of(
        spec_with(tmp_path, {"default": {"block": "gen-config-test"}}), engine_kwargs
    )
    assert got == {"model": model, **OPTIONS}
    # and the block's identity is in the step fingerprint: another dtype, other keys
    other = dict(OPTIONS, dtype="float32")
    ServingConfig(model=model, **other).save("gen-config-test-2", overwrite=True)
    keys = [
        build_plan(spec_with(tmp_path, {"default": {"block": b}})).keys[0][0]
        for b in ("gen-config-test", "gen-config-test-2")
    ]
    assert keys[0] != keys[1]


def test_cpu_defaults_when_options_are_left_out(tmp_path: Path, engine_kwargs: list[dict]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU defaults")
    model = model_folder(tmp_path)
    got = engine_options_of(spec_with(tmp_path, {"default": {"model": model}}), engine_kwargs)
    assert got["dtype"] == "float32" and got["enforce_eager"] is True
    assert got["distributed_executor_backend"] == "uni"
    assert got["kv_cache_memory_bytes"] == 512 * 2**20


def test_devices_from_yaml_give_one_bound_replica_each(tmp_path: Path) -> None:
    """``devices: "0,1"`` in the spec: two replica processes, each with its own
    CUDA_VISIBLE_DEVICES, both serving the run's batches (round-robin)."""
    serving = {
        "default": {
            "backend": "fake",
            "model": "echo",
            "devices": "0,1",
            "max_batch": 2,
            "batch_timeout_s": 0.0,
        }
    }
    spec = {**spec_with(tmp_path, serving), "batch_size": 2}  # 3 batches: 3 submits
    plan = build_plan(spec)
    assert plan.serving["default"].device_list() == ["0", "1"]
    with shared_serving(plan.serving) as pool:
        state = run_pipeline(spec=spec, return_state=True)
        assert state.is_completed(), state.message
        served = pool.served("default")
        devices = [b.backend.identity()["device"] for b in served.backends]
        calls = [batcher.backend_calls for batcher in served.batchers]
        pids = {b.backend.pid for b in served.backends}
    assert devices == ["0", "1"]
    assert all(c > 0 for c in calls), f"round-robin over both replicas: {calls}"
    assert len(pids) == 2
    assert read_output(build_plan(spec))["out"].to_list() == [
        f"echo: {r['text']}" for r in make_rows(6, "c")
    ]


def test_model_chat_template_sampling_and_seed_are_in_the_fingerprint(tmp_path: Path) -> None:
    """Change the weights, the chat template, a sampling parameter or the seed: the
    generation step (and only it and what follows) gets a new cache key."""
    model = Path(model_folder(tmp_path))
    (model / "model.safetensors").write_bytes(b"x" * 10)
    (model / "chat_template.jinja").write_text("{{ messages }}")
    base = {"prompt": "{{ text }}", "output": "out", "temperature": 0, "seed": 0}

    template = spec_with(tmp_path, {"default": {"model": str(model)}})  # writes the data once

    def keys(**change: object) -> list[str]:
        spec = dict(template)
        spec["steps"] = [{"filter": {"where": "n > 0"}}, {"generate": {**base, **change}}]
        plan = build_plan(spec)
        return [plan.keys[0][0], plan.keys[1][0]]

    first = keys()
    assert keys() == first, "stable"
    for change in (
        {"temperature": 0.7},
        {"seed": 1},
        {"top_p": 0.9},
        {"max_tokens": 9},
        {"system": "Be brief."},
        {"stop": ["\n"]},
    ):
        other = keys(**change)
        assert other[0] == first[0] and other[1] != first[1], change
    (model / "chat_template.jinja").write_text("{{ messages | tojson }}")
    templated = keys()
    assert templated[0] == first[0] and templated[1] != first[1], "chat template"
    (model / "model.safetensors").write_bytes(b"x" * 11)
    assert keys()[1] not in (first[1], templated[1]), "weights"


def test_the_engine_shuts_down_when_the_flow_fails() -> None:
    from prefect import flow

    from nightshift.serving.interface import GenerationRequest
    from nightshift.serving.pool import current_pool
    from nightshift.serving.runner import ServingTaskRunner

    seen: list = []

    @flow(task_runner=ServingTaskRunner({"default": ServingConfig(backend="fake", model="x")}))
    def failing() -> None:
        pool = current_pool()
        assert pool.submit("default", [GenerationRequest(prompt="hi")])[0].text == "echo: hi"
        seen.append(pool.served("default").backends[0].backend)
        raise RuntimeError("boom")

    state = failing(return_state=True)
    assert state.is_failed() and "boom" in (state.message or "")
    [backend] = seen
    assert backend.closed, "the runner closed its backend although the flow failed"


def test_runners_compare_by_serving_configs_and_check_their_options() -> None:
    """Like prefect-dask's DaskTaskRunner: equal settings, equal runners; conflicting or
    malformed options fail in the constructor, not at the first task."""
    from nightshift.serving.runner import ServingTaskRunner

    fake = {"backend": "fake", "model": "x"}
    runner = ServingTaskRunner({"default": fake}, max_workers=2)
    assert runner == ServingTaskRunner({"default": ServingConfig(**fake)}, max_workers=2)
    assert runner == runner.duplicate()
    assert runner != ServingTaskRunner({"default": {**fake, "model": "y"}}, max_workers=2)
    assert runner != ServingTaskRunner({"other": fake}, max_workers=2)
    assert runner != ServingTaskRunner({"default": fake}, max_workers=3)
    for bad in (
        {"serving": {}},
        {"serving": {"default": 3}},
        {"serving": {"": fake}},
        {"serving": {"default": fake}, "max_workers": 0},
    ):
        with pytest.raises(ValueError):
            ServingTaskRunner(**bad)
    with pytest.warns(DeprecationWarning, match="ServingTaskRunner"):
        from nightshift.serving.runner import VLLMTaskRunner
    assert VLLMTaskRunner is ServingTaskRunner
