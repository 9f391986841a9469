"""Several samples per prompt (``n``), scoring a list of candidates, ``pick_best`` and a
``messages`` input column: on the session's shared real vLLM engine and over HTTP against
vLLM's own API server.

* ``n: 3`` gives each row a list of 3 samples, sample ``i`` exactly what the engine
  answers for the same request with seed ``seed + i`` asked again in a call of its own
  (another batch composition: the rerun that shows the samples are reproducible);
  ``_row_id`` and the row count are the source's.
* ``judge`` over that list column scores each candidate (one request each, a list of
  scores) and ``pick_best`` keeps the best candidate and its score.
* ``messages``: a multi-turn chat per row, ``system`` prepended; a bad row is that row's
  error; a missing or mistyped column fails the schema dry run in one line.
* Over HTTP (vLLM's API server, each sample a request with its seed, through the answer
  cache) the same step writes the same samples as the in-process engine.
* Keys: ``n`` changes a step's key; ``n: 1`` keeps the key a step had before ``n`` existed.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError
from vllm_shared import SERVING, shared_backend, shared_pool, skip_without_vllm

skip_without_vllm()

from conftest import write_jsonl

from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import code_version, digest
from nightshift.flows.pipeline import Pipeline
from nightshift.serving.interface import ChatMessage, GenerationRequest, SamplingParams
from nightshift.serving.runner import shared_serving
from nightshift.tasks.operators import Generate, Judge, PickBest
from nightshift.tasks.operators.base import _keyed_path
from nightshift.tasks.stages import dry_run

pytest_plugins = ["api_fixtures"]

QUESTIONS = ["Name a fruit.", "Name a color.", "Name an animal."]
CHATS = [
    [
        {"role": "user", "content": "My name is Ana."},
        {"role": "assistant", "content": "Nice to meet you, Ana."},
        {"role": "user", "content": "What is my name?"},
    ],
    [],  # an empty chat: that row's error
    [{"role": "user", "content": "Say hi."}],
]
SYSTEM = "Answer briefly."
N, TEMPERATURE, MAX_TOKENS = 3, 0.9, 8


def source(tmp_path: Path) -> str:
    path = tmp_path / "data" / "q.jsonl"
    write_jsonl(path, [{"q": q, "chat": c} for q, c in zip(QUESTIONS, CHATS, strict=True)])
    return str(path)


def sample_step() -> Generate:
    return Generate(
        prompt="{{ q }}", output="answers", n=N, temperature=TEMPERATURE, max_tokens=MAX_TOKENS
    )


def direct(
    messages: list[dict],
    seed: int | None,
    temperature: float = TEMPERATURE,
    max_tokens: int = MAX_TOKENS,
) -> GenerationRequest:
    return GenerationRequest(
        messages=[ChatMessage(**m) for m in messages],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
    )


def test_n_samples_judge_each_pick_best_and_chat_messages_on_the_engine(tmp_path: Path) -> None:
    steps = [
        sample_step(),
        Judge(
            input="answers", rubric="relevance", output="scores", max_tokens=4, max_error_rate=1.0
        ),
        PickBest(candidates="answers", scores="scores", output="best"),
        Generate(
            messages="chat",
            system=SYSTEM,
            output="reply",
            max_tokens=MAX_TOKENS,
            max_error_rate=0.5,
        ),
    ]

    def run(store: str) -> pl.DataFrame:
        pipe = Pipeline(
            "samples",
            source=source(tmp_path),
            steps=steps,
            store=f"file://{tmp_path}/{store}",
            batch_size=3,
            serving=SERVING,
        )
        with shared_serving(shared_pool()):
            pipe.run()
        return pipe.read()

    handed = shared_pool().handover()["taken"]
    out = run("first")
    # row-level hand-over: every candidate's judge request was prefetched by the sampling
    # task as its row was answered, and taken by the judge (its answers checked below)
    assert shared_pool().handover()["taken"] - handed == len(QUESTIONS) * N
    assert out.height == len(QUESTIONS)
    assert (out["_row_id"] & 0xFFFFFFFF).to_list() == [0, 1, 2], "row ids are the source's"
    assert out.schema["answers"] == pl.List(pl.String)
    assert out.schema["answers_error"] == pl.List(pl.String)
    assert out.schema["answers_prompt_tokens"] == pl.Int64

    # sample i is what the engine answers for the same request with seed i (seed 0 + i)
    asked = [direct([{"role": "user", "content": q}], seed=i) for q in QUESTIONS for i in range(N)]
    reference = shared_backend().generate(asked)
    expected = [[r.text for r in reference[k * N : (k + 1) * N]] for k in range(len(QUESTIONS))]
    assert out["answers"].to_list() == expected
    assert out["answers_error"].to_list() == [[None] * N] * len(QUESTIONS)
    assert out["answers_finish_reason"].list.len().to_list() == [N] * len(QUESTIONS)
    assert out["answers_completion_tokens"].to_list() == [
        sum(r.completion_tokens for r in reference[k * N : (k + 1) * N])
        for k in range(len(QUESTIONS))
    ]
    assert any(len(set(samples)) > 1 for samples in expected), "seeds give different samples"

    # judge over the list: one score (or error) per candidate, from that candidate's request
    for row in out.iter_rows(named=True):
        assert len(row["scores"]) == len(row["scores_error"]) == len(row["scores_raw"]) == N
        for score, error in zip(row["scores"], row["scores_error"], strict=True):
            assert (score is None) != (error is None)
            assert score is None or 1 <= score <= 5
    judge_prompt = steps[1]._prompt_op().process(pl.DataFrame({"answers": [expected[0][1]]}))
    [raw] = shared_backend().generate(
        [
            direct(
                [{"role": "user", "content": judge_prompt["__prompt__"][0]}],
                seed=0,
                temperature=0.0,
                max_tokens=4,
            )
        ]
    )
    assert out["scores_raw"][0][1] == raw.text

    # pick_best: the first candidate of the highest score; nulls when nothing was scored
    for row in out.iter_rows(named=True):
        scored = [(s, -i) for i, s in enumerate(row["scores"]) if s is not None]
        if not scored:
            assert row["best"] is None and row["best_score"] is None
            continue
        score, neg_index = max(scored)
        assert (row["best"], row["best_score"]) == (row["answers"][-neg_index], score)

    # messages: the whole chat, system first; the empty chat is that row's error
    chats = [
        direct([{"role": "system", "content": SYSTEM}, *CHATS[i]], seed=0, temperature=0.0)
        for i in (0, 2)
    ]
    replies = shared_backend().generate(chats)
    assert out["reply"].to_list() == [replies[0].text, None, replies[1].text]
    assert out["reply_error"].to_list() == [None, "messages is an empty list", None]
    assert out.schema["reply"] == pl.String, "n: 1 keeps scalar columns"


def test_n_samples_over_http(tmp_path: Path, vllm_server: str) -> None:
    """``n`` over an OpenAI-compatible server (each sample a request with its own seed,
    through the answer cache): lists of n, and the same samples as the in-process engine
    (same weights, float32, per-request seeds; it held on every run here, so it is
    asserted: a difference would mean the seed does not reach the server)."""
    serving = {
        "default": {
            "backend": "openai_compatible",
            "base_url": f"{vllm_server}/v1",
            "model": "smollm2",
            "timeout_s": 30.0,
        }
    }

    def run(store: str) -> pl.DataFrame:
        pipe = Pipeline(
            "samples-http",
            source=source(tmp_path),
            steps=[sample_step()],
            store=f"file://{tmp_path}/{store}",
            batch_size=3,
            serving=serving,
        )
        summary = pipe.run()
        [usage] = summary["steps"][0]["batch_usage"]
        out = pipe.read()
        assert usage["answered"] == N * len(QUESTIONS), "one request per sample"
        assert usage["completion_tokens"] == out["answers_completion_tokens"].sum() > 0
        return out

    out = run("first")
    assert (out["_row_id"] & 0xFFFFFFFF).to_list() == [0, 1, 2]
    assert out["answers"].list.len().to_list() == [N] * len(QUESTIONS)
    assert out["answers_error"].to_list() == [[None] * N] * len(QUESTIONS)
    asked = [direct([{"role": "user", "content": q}], seed=i) for q in QUESTIONS for i in range(N)]
    engine = [r.text for r in shared_backend().generate(asked)]
    assert out["answers"].explode().to_list() == engine


def test_keys_validation_and_dry_run() -> None:
    """``n: 1`` and no ``messages`` leave the config (so the key) exactly as it was before
    the fields existed; ``n`` above 1 and ``messages`` change it; bad configs and columns
    are one line naming step and column."""
    context = {"serving": {"default": {"backend": "vllm", "model": "m"}}}
    for op in (
        Generate(prompt="{{ q }}", output="a", temperature=0.5, seed=7),
        Judge(input="a", rubric="r", output="s"),
    ):
        absent = op.model_dump(mode="json", exclude={"batch_size", "n", "messages"})
        before = digest(
            digest(_keyed_path(op.import_path()), code_version(type(op)), absent, "up"),
            context["serving"]["default"],
        )
        assert op.fingerprint("up", context) == before, "n: 1 keeps the key"
        assert "n" not in op.spec_entry()[op.name] and "messages" not in op.spec_entry()[op.name]
        three = op.model_copy(update={"n": 3, "temperature": 0.5})
        assert three.fingerprint("up", context) != before
        assert three.fingerprint("up", context) != op.model_copy(
            update={"n": 2, "temperature": 0.5}
        ).fingerprint("up", context)
    chat = Generate(messages="chat", output="a")
    assert chat.fingerprint("up", context) != Generate(input="chat", output="a").fingerprint(
        "up", context
    )

    with pytest.raises(ValidationError, match="n: 3 needs temperature > 0"):
        Generate(prompt="x", output="a", n=3)
    with pytest.raises(ValidationError, match=r"exactly one of 'prompt'.*'messages'"):
        Generate(prompt="x", messages="chat", output="a")

    schema = pl.Schema({"q": pl.String, "chat": pl.String})
    with pytest.raises(
        SpecError, match=r"^steps\[0\] \(generate\): messages column 'chat' must be"
    ):
        dry_run([chat], schema)
    with pytest.raises(SpecError, match=r"^steps\[0\] \(generate\): missing column chat"):
        dry_run([chat], pl.Schema({"q": pl.String}))
    listed = pl.Schema({"q": pl.List(pl.String)})
    with pytest.raises(SpecError, match=r"steps\[1\] \(generate\): n: 2 over the list column 'a'"):
        dry_run(
            [
                Generate(input="q", output="a", n=2, temperature=1.0),
                Generate(input="a", output="b", n=2, temperature=1.0),
            ],
            pl.Schema({"q": pl.String}),
        )
    out = dry_run(
        [
            sample_step(),
            Judge(input="answers", rubric="r", output="s"),
            PickBest(candidates="answers", scores="s", output="best"),
        ],
        pl.Schema({"q": pl.String}),
    )
    assert (out["answers"], out["s"], out["s_raw"], out["best"], out["best_score"]) == (
        pl.List(pl.String),
        pl.List(pl.Int64),
        pl.List(pl.String),
        pl.String,
        pl.Int64,
    )
    assert dry_run([Judge(input="q", rubric="r", output="s")], listed)["s"] == pl.List(pl.Int64)
    with pytest.raises(SpecError, match=r"steps\[0\] \(pick_best\): .*column 'q' must be a list"):
        dry_run([PickBest(candidates="q", scores="q", output="b")], pl.Schema({"q": pl.String}))


def test_failed_samples_bad_chats_and_skipped_rows_fold_into_their_lists() -> None:
    """The fake backend (fails the sample with seed 1) through the same serving interface:
    errors land at their sample index, ``max_error_rate`` counts samples, a bad chat is its
    row's error (n failed samples, no request), ``skip_if`` rows get null lists."""
    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.core.errors import StepFailed
    from nightshift.serving.fake_backend import FakeBackend
    from nightshift.serving.pool import ServingPool
    from nightshift.tasks.operators import apply_operator

    fake = FakeBackend(fail_if=lambda r: r.sampling.seed == 1)
    pool = ServingPool(
        {"default": ServingConfig(backend="fake", model="echo")}, backends={"default": fake}
    )
    df = pl.DataFrame(
        {
            "_row_id": [0, 1, 2, 3],
            "q": ["a", "b", "c", "skip"],
            "chat": [
                [{"role": "user", "content": "hi"}],
                [],
                [{"role": "bot", "content": "x"}],
                None,
            ],
        }
    )
    try:  # the pool handed over explicitly, as the step task does
        samples = Generate(
            prompt="{{ q }}",
            output="s",
            n=2,
            temperature=1.0,
            max_error_rate=0.5,
            skip_if="q = 'skip'",
        )
        out = apply_operator(samples, df, pool=pool)
        assert out["s"].to_list() == [["echo: a", None], ["echo: b", None], ["echo: c", None], None]
        assert [e and [x is None for x in e] for e in out["s_error"].to_list()] == [
            [True, False]
        ] * 3 + [None]
        assert out["s_completion_tokens"].to_list() == [2, 2, 2, 0], "summed over the samples"
        with pytest.raises(StepFailed, match=r"^3/6 samples failed \(50% > max_error_rate 40%\)"):
            apply_operator(samples.model_copy(update={"max_error_rate": 0.4}), df, pool=pool)

        calls = fake.calls
        chats = apply_operator(
            Generate(
                messages="chat",
                output="r",
                system="S",
                n=2,
                seed=4,
                temperature=1.0,
                max_error_rate=1.0,
            ),
            df,
            pool=pool,
        )
        assert chats["r"].to_list()[0] == ["echo: hi", "echo: hi"]
        assert chats["r_error"].to_list()[1:] == [
            ["messages is an empty list"] * 2,
            ["messages[0].role is 'bot', not one of system, user, assistant"] * 2,
            ["messages is null"] * 2,
        ]
        assert fake.batch_sizes[calls:] == [2], "only the good chat was asked (seeds 4 and 5)"
    finally:
        pool.close()
