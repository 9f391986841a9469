"""The answer cache on a local store and on a real S3 API (moto's server): answers
persist as they arrive, torn lines are skipped, identical requests stay distinct, and a
batch's answers go once its output is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nightshift.blocks.step_store import StepStore
from nightshift.serving.interface import GenerationRequest, GenerationResult, SamplingParams
from nightshift.tasks.answer_cache import AnswerLog, answers_dir, batch_scope, request_fingerprints

OUT = "steps/00-generate/a-0-0123456789abcdef.parquet"


def answer(i: int) -> GenerationResult:
    return GenerationResult(
        text=f"answer {i}", finish_reason="stop", prompt_tokens=3, completion_tokens=2
    )


def test_answers_dir_sits_beside_the_steps() -> None:
    assert (
        answers_dir("/r/p/steps/01-generate/a-100-abc.parquet")
        == "/r/p/answers/01-generate/a-100-abc"
    )
    with pytest.raises(ValueError):
        answers_dir("/r/p/other/x.parquet")


def test_fingerprints_cover_content_sampling_identity_and_duplicates() -> None:
    same = GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=4))
    other = GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=5))
    a, b, c = request_fingerprints([same, same, other], {"model": "m"})
    assert len({a, b, c}) == 3, "a duplicate request is its own sample"
    assert request_fingerprints([same], {"model": "m"}) == [a]
    assert request_fingerprints([same], {"model": "n"}) != [a]


def test_local_answers_survive_without_close_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    store = StepStore(url=f"file://{tmp_path}")
    directory = store.path("p", "answers", "00-generate", "a-0-key")
    log = AnswerLog(store, directory)
    for i in range(5):
        log.add(f"fp{i}", answer(i))
    log.add("failed", GenerationResult.failed("503"))  # errors are not cached
    # no close(): what a SIGKILL leaves is already on disk
    [path] = list(Path(directory).glob("*.jsonl"))
    assert len(path.read_bytes().splitlines()) == 5
    with open(path, "ab") as f:
        f.write(b'{"fp": "fp9", "text": "cut')  # a line torn by a crash
    again = AnswerLog(store, directory).load()
    assert sorted(again) == [f"fp{i}" for i in range(5)] and again["fp3"] == answer(3)
    log.discard()
    assert not os.path.exists(directory)


def test_s3_answers_are_flushed_in_chunks(s3, s3_endpoint) -> None:
    store = StepStore(url="s3://nightly/answers-test", endpoint_url=s3_endpoint)
    with batch_scope(store, store.path("p", OUT)) as scope:
        log = scope.answer_log()
        log.flush_rows = 50
        for i in range(120):
            log.add(f"fp{i}", answer(i))
        log._pending[-1].result()  # the uploads run off the caller's thread
        assert len(log.load()) == 100, "two chunks of 50 are stored before the batch ends"
    directory = answers_dir(store.path("p", OUT))
    assert len(s3.ls(directory)) == 3, "the last 20 were flushed when the scope closed"
    assert len(AnswerLog(store, directory).load()) == 120
    with batch_scope(store, store.path("p", OUT)) as scope:
        assert len(scope.answer_log().load()) == 120
        scope.completed()  # the batch's output is written: its answers go
    s3.invalidate_cache()
    assert not s3.exists(directory)
