"""Generation through the pipeline with the real SmolLM2 on real vLLM (CPU here).

Greedy output is deterministic and asserted; the engine loads once per flow run; rows keep
their metadata whatever the batch size and completion order; per-row errors and the
error-rate limit; structured output; a run killed mid-generation resumes without
regenerating completed batches, to the same output.

All but two tests run on the session's shared engine (``tests/vllm_shared.py``);
``test_one_flow_run_loads_one_engine`` starts its own (that is what it checks) and the
kill/resume test SIGKILLs a CLI run in a subprocess (its own engine), then resumes it here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from vllm_shared import SERVING, shared_backend, shared_pool, skip_without_vllm

skip_without_vllm()

from conftest import start_cli, write_jsonl

from nightshift.core.errors import NightshiftError
from nightshift.flows.outputs import read_output
from nightshift.flows.pipeline import Pipeline, run_spec
from nightshift.flows.plan import build_plan
from nightshift.serving.interface import ChatMessage, GenerationRequest, SamplingParams
from nightshift.serving.pool import ServingPool
from nightshift.serving.runner import shared_serving
from nightshift.serving.vllm_backend import VLLMBackend
from nightshift.tasks.operators import Classify, Filter, Generate, Judge
from nightshift.tasks.spec import load_spec

SYSTEM = "Answer in one short sentence."
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What animal says meow?",
    "What is the opposite of hot?",
    "Name a fruit that is yellow.",
    "How many days are in a week?",
    "What do bees make?",
    "What color is the sky on a clear day?",
    "Name a planet in our solar system.",
    "What is frozen water called?",
]


class Person(BaseModel):
    name: str
    age: int


def rows() -> list[dict]:
    return [
        {"qid": f"q{i}", "question": q, "meta": i * 10, "tags": [f"t{i}", "x"]}
        for i, q in enumerate(QUESTIONS)
    ]


def answer_step(max_tokens: int = 24) -> Generate:
    return Generate(prompt="{{ question }}", output="answer", max_tokens=max_tokens, system=SYSTEM)


def reference(max_tokens: int = 24) -> list:
    """What the engine answers for each question, asked directly (no pipeline)."""
    requests = [
        GenerationRequest(
            messages=[
                ChatMessage(role="system", content=SYSTEM),
                ChatMessage(role="user", content=q),
            ],
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0),
        )
        for q in QUESTIONS
    ]
    return shared_backend().generate(requests)


@pytest.fixture(scope="module")
def expected() -> list:
    return reference()


def test_one_flow_run_loads_one_engine(tmp_path: Path, expected: list) -> None:
    """A run of 3 batches x 2 LLM steps (6 generation tasks) starts one engine, its own
    (no shared engine here), and answers exactly what the engine answers directly."""
    write_jsonl(tmp_path / "data" / "q.jsonl", rows())
    pipe = Pipeline(
        "gen",
        source=str(tmp_path / "data" / "q.jsonl"),
        steps=[
            answer_step(),
            Judge(input="answer", rubric="helpfulness", output="score", max_error_rate=1.0),
        ],
        store=f"file://{tmp_path}/store",
        batch_size=5,
        serving=SERVING,
    )
    loads, starts = VLLMBackend.engine_loads, ServingPool.total_starts["default"]
    summary = pipe.run()
    assert VLLMBackend.engine_loads == loads + 1, "one engine for the whole flow run"
    assert ServingPool.total_starts["default"] == starts + 1
    assert [s["computed"] for s in summary["steps"]] == [3, 3]
    out = pipe.read()
    assert out["answer"].to_list() == [r.text for r in expected], "greedy: same text as direct"
    assert "Paris" in out["answer"][0]
    assert out["answer_error"].null_count() == len(QUESTIONS)
    assert out["meta"].to_list() == [i * 10 for i in range(len(QUESTIONS))]
    assert out["score"].drop_nulls().is_between(1, 5).all()
    assert out["score_raw"].null_count() == 0
    # token counts per batch are recorded, and add up to the rows' counts
    gen = summary["steps"][0]
    assert gen["completion_tokens"] == out["answer_completion_tokens"].sum() > 0
    assert gen["prompt_tokens"] == out["answer_prompt_tokens"].sum() > 0


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch_size=st.integers(1, 12), workers=st.integers(1, 4), in_flight=st.integers(1, 8))
def test_rows_keep_their_metadata_whatever_the_batch_size(
    tmp_path_factory: pytest.TempPathFactory,
    expected: list,
    batch_size: int,
    workers: int,
    in_flight: int,
) -> None:
    """Random batch sizes, worker counts and pipelining depths (so random completion
    orders) through the real engine: every row gets its own answer, its own token
    counts, and keeps every column it came with."""
    tmp_path = tmp_path_factory.mktemp("meta")
    write_jsonl(tmp_path / "data" / "q.jsonl", rows())
    pipe = Pipeline(
        "meta",
        source=str(tmp_path / "data" / "q.jsonl"),
        steps=[Filter(where="meta <> 50"), answer_step()],
        store=f"file://{tmp_path}/store",
        batch_size=batch_size,
        serving=SERVING,
        workers=workers,
        max_in_flight=in_flight,
    )
    with shared_serving(shared_pool()):
        pipe.run()
    out = pipe.read()
    kept = [i for i in range(len(QUESTIONS)) if i != 5]
    assert out["qid"].to_list() == [f"q{i}" for i in kept]
    for row in out.iter_rows(named=True):
        i = int(row["qid"][1:])
        assert (row["question"], row["meta"], row["tags"]) == (QUESTIONS[i], i * 10, [f"t{i}", "x"])
        assert row["answer"] == expected[i].text
        assert row["answer_prompt_tokens"] == expected[i].prompt_tokens
        assert row["answer_completion_tokens"] == expected[i].completion_tokens
        assert row["answer_finish_reason"] == expected[i].finish_reason


def test_row_errors_classify_and_structured_output(tmp_path: Path) -> None:
    data = rows()[:4]
    data[2]["question"] = "word " * 800  # far beyond max_model_len 512
    write_jsonl(tmp_path / "data" / "q.jsonl", data)
    steps = [
        Generate(input="question", output="a", max_tokens=8, max_error_rate=0.5),
        Classify(input="question", labels=["math", "other"], output="kind", max_error_rate=0.5),
        Generate(
            prompt="Invent a person who could ask: {{ question }}",
            json_schema=Person,
            output="person",
            max_tokens=48,
            max_error_rate=0.5,
        ),
        Generate(
            input="qid",
            json_schema={"type": "object"},
            output="cut",
            max_tokens=2,
            max_error_rate=1.0,
        ),
    ]
    pipe = Pipeline(
        "errs",
        source=str(tmp_path / "data" / "q.jsonl"),
        steps=steps,
        store=f"file://{tmp_path}/s",
        batch_size=4,
        serving=SERVING,
    )
    with shared_serving(shared_pool()):
        pipe.run()
    out = pipe.read()
    for column in ("a", "kind", "person"):
        errors = out[f"{column}_error"].to_list()
        assert [e is None for e in errors] == [True, True, False, True], column
        assert "max_model_len" in errors[2]
        assert out[column][2] is None
    assert set(out["kind"].drop_nulls().to_list()) <= {"math", "other"}
    # guided decoding under the pydantic model's schema: every served row validates
    people = [Person.model_validate_json(t) for t in out["person"].drop_nulls().to_list()]
    assert len(people) == 3
    # two tokens cannot hold a JSON object: each row is an error, kept with its reply data
    assert out["cut"].null_count() == 4
    assert out["cut_error"].str.contains("not valid JSON").all()
    assert (out["cut_completion_tokens"] == 2).all()


def test_a_batch_fails_only_past_its_error_rate(tmp_path: Path) -> None:
    data = rows()[:4]
    data[0]["question"] = "word " * 800  # batch 0: 1 of 2 rows fails (50%); batch 1: none
    write_jsonl(tmp_path / "data" / "q.jsonl", data)

    def pipe(rate: float) -> Pipeline:
        return Pipeline(
            "rate",
            source=str(tmp_path / "data" / "q.jsonl"),
            steps=[Generate(input="question", output="a", max_tokens=8, max_error_rate=rate)],
            store=f"file://{tmp_path}/s{rate}",
            batch_size=2,
            serving=SERVING,
        )

    strict = pipe(0.4)
    with (
        shared_serving(shared_pool()),
        pytest.raises(
            NightshiftError, match=r"1/2 rows failed \(50% > max_error_rate 40%\); first: prompt is"
        ),
    ):
        strict.run()
    done = list((tmp_path / "s0.4").glob("rate/steps/00-generate/*.parquet"))
    assert len(done) == 1, "the batch under the limit completed and is kept"
    tolerant = pipe(0.5)
    with shared_serving(shared_pool()):
        tolerant.run()
    assert [e is None for e in tolerant.read()["a_error"].to_list()] == [False, True, True, True]


def test_kill_mid_generation_then_resume(tmp_path: Path, prefect_api: str) -> None:
    write_jsonl(tmp_path / "data" / "q.jsonl", rows())
    spec = {
        "name": "genkill",
        "source": {"path": str(tmp_path / "data" / "q.jsonl")},
        "batch_size": 2,
        "store": {"url": f"file://{tmp_path}/store"},
        "workers": 1,
        "max_in_flight": 1,
        "serving": SERVING,
        "steps": [{"generate": json.loads(answer_step().model_dump_json())}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    stage = tmp_path / "store" / "genkill" / "steps" / "00-generate"
    proc = start_cli(["run", str(path)], prefect_api)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(stage.glob("*.parquet"))) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in stage.glob("*.parquet")}
    assert 2 <= len(done) < 6, "the kill must land mid-generation"

    # the resume runs in this process on the session's engine (a second engine start in a
    # subprocess cost ~1 min; the CLI's own resume after a SIGKILL is test_crash_resume's)
    with shared_serving(shared_pool()):
        summary = run_spec(load_spec(path))
    [step] = summary["steps"]
    assert (step["reused"], step["computed"]) == (len(done), 6 - len(done))
    for name, identity in done.items():
        f = stage / name
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == identity, f"{name} was regenerated"
    assert len(list(stage.glob("*.parquet"))) == 6

    got = read_output(build_plan(load_spec(path)))
    uninterrupted = Pipeline(
        "genref",
        source=str(tmp_path / "data" / "q.jsonl"),
        steps=[answer_step()],
        store=f"file://{tmp_path}/ref",
        batch_size=2,
        serving=SERVING,
        workers=1,
    )
    with shared_serving(shared_pool()):
        uninterrupted.run()
    assert got.height == len(QUESTIONS)
    assert got.equals(uninterrupted.read())
