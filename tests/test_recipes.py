"""The three recipes of ``examples/recipes/`` end to end on the embedded model (real vLLM).

Each recipe runs as written (its YAML), with its source, store and batch size pointed at
the test's folders: ``validate``, a run, the invariants of its output; then a run through
the CLI in a subprocess that is SIGKILLed once some of its LLM work is in the store, a
re-run, and the output must equal the uninterrupted run's, with nothing completed before
the kill recomputed.

Every run reaches the model through the session's vLLM OpenAI API server
(``tests/api_fixtures.py``: real vLLM, the same embedded model, the same per-request seeds
and guided JSON decoding as the in-process engine the recipes' ``serving`` names; that
config is checked, and ``validate`` runs on it as written). The killed CLI subprocess so
starts no engine of its own (~20 s on 2 cores each), and the reference, the killed run and
its re-run all reach the model the same way (the backend is part of the step
fingerprints). Engine-path runs of the operators are covered in ``tests/test_generation_vllm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from vllm_shared import SERVING, skip_without_vllm

skip_without_vllm()

from conftest import ROOT, start_cli

from nightshift.flows.outputs import read_output
from nightshift.flows.pipeline import run_spec
from nightshift.flows.plan import build_plan
from nightshift.tasks.operators import ROW_ID
from nightshift.tasks.operators.near_dedup import NearDedup
from nightshift.tasks.spec import load_spec

pytest_plugins = ["api_fixtures"]

RECIPES = ROOT / "examples" / "recipes"
NAMES = ["questions-from-documents", "preference-pairs", "consensus"]


#: Rows of each recipe's data the tests run on (the first ones): few, for the suite's time.
ROWS = 2


def recipe(name: str, work: Path, store: Path) -> dict:
    """The recipe's spec as a user runs it, with its source the first ``ROWS`` rows of its
    data (copied into ``work`` once), the store in ``store`` and one row per batch (so a
    kill lands between batches)."""
    spec = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert spec["serving"] == SERVING, "the recipes run on the shared engine's config"
    shipped = ROOT / spec["source"]["path"]
    data = work / "data" / shipped.name
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(shipped.read_text().splitlines(keepends=True)[:ROWS]))
    spec["source"]["path"] = str(data)
    spec["store"] = {"url": f"file://{store}"}
    spec.update(batch_size=1, workers=2, max_in_flight=2)
    return spec


def over_http(spec: dict, url: str) -> dict:
    """``spec`` with its one serving config the vLLM OpenAI API server at ``url``."""
    return {
        **spec,
        "serving": {
            "default": {
                "backend": "openai_compatible",
                "base_url": f"{url}/v1",
                "model": "smollm2",
                "max_concurrency": 32,
            }
        },
    }


def run(spec: dict) -> tuple[dict, pl.DataFrame]:
    summary = run_spec(load_spec(spec))
    return summary, read_output(build_plan(spec))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's folder: the recipes' data (their first rows) and the reference runs."""
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def uninterrupted(work: Path, vllm_server: str) -> dict[str, tuple[dict, pl.DataFrame, dict]]:
    """Each recipe run once, uninterrupted, through the API server (the reference of the
    kill tests): its summary, its output and its spec."""
    out = {}
    for name in NAMES:
        spec = over_http(recipe(name, work, work / "uninterrupted" / name), vllm_server)
        out[name] = (*run(spec), spec)
    return out


def source(name: str, work: Path) -> pl.DataFrame:
    return pl.read_ndjson(recipe(name, work, work / "unused")["source"]["path"])


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates(name: str, tmp_path: Path, work: Path) -> None:
    plan = build_plan(recipe(name, work, tmp_path / "store"))
    assert plan.stages, name
    assert not (tmp_path / "store" / name / "steps").exists(), "validate runs no step"


def test_questions_from_documents(uninterrupted: dict, work: Path) -> None:
    summary, out, spec = uninterrupted["questions-from-documents"]
    plan = build_plan(spec)
    docs = read_output(plan, step=0)  # the documents with their JSON reply
    questions = read_output(plan, step="questions")  # one row per question
    judged = read_output(plan, step="judge")
    asked = [json.loads(r)["questions"] for r in docs["reply"]]
    assert docs.height == source("questions-from-documents", work).height
    assert questions.height == sum(map(len, asked)) > docs.height, "1 -> N rows"
    assert questions["question"].to_list() == [q for qs in asked for q in qs], "in order"
    assert questions["_parent_id"].to_list() == [
        i for i, qs in zip(docs[ROW_ID], asked, strict=True) for _ in qs
    ]
    assert questions[ROW_ID].n_unique() == questions.height
    scores = [json.loads(v)["score"] if v else None for v in judged["verdict"]]
    good = judged.with_columns(score=pl.Series(scores, dtype=pl.Int64)).filter(pl.col("score") >= 3)
    # the near-duplicates among the good questions are gone, the first of each kept
    dedup = NearDedup(column="question", threshold=0.7)
    near = dedup.index(good.lazy())[ROW_ID].implode()
    assert out.columns == [ROW_ID, "doc_id", "_parent_id", "question", "answer", "score"]
    assert out[ROW_ID].to_list() == good.filter(~pl.col(ROW_ID).is_in(near))[ROW_ID].to_list()
    assert (out["score"] >= 3).all() and dedup.index(out.lazy()).height == 0
    rows_out = [s.get("rows_out") for s in summary["steps"]]
    assert max(rows_out) > docs.height, f"status shows the multiplication: {rows_out}"


def test_preference_pairs(uninterrupted: dict, work: Path) -> None:
    _, out, spec = uninterrupted["preference-pairs"]
    grouped = read_output(build_plan(spec), step="grouped")
    instructions = source("preference-pairs", work)
    assert grouped["instruction_id"].to_list() == instructions["instruction_id"].to_list()
    expected = []
    for row in grouped.iter_rows(named=True):
        answers, scores = row["answers"], row["scores"]
        assert len(answers) == 4 and len(scores) == 4, row
        valid = [(s, i) for i, s in enumerate(scores) if s is not None]
        if not valid:
            continue
        best = min(valid, key=lambda p: (-p[0], p[1]))  # highest, then the earliest sample
        worst = min(valid, key=lambda p: (p[0], p[1]))  # lowest, then the earliest sample
        if best[0] > worst[0]:
            expected.append(
                {
                    "instruction_id": row["instruction_id"],
                    "chosen": answers[best[1]],
                    "rejected": answers[worst[1]],
                    "chosen_score": best[0],
                    "rejected_score": worst[0],
                }
            )
    assert out.columns == [
        ROW_ID,
        "instruction_id",
        "instruction",
        "chosen",
        "rejected",
        "chosen_score",
        "rejected_score",
        "answers",
        "scores",
    ]
    got = out.select("instruction_id", "chosen", "rejected", "chosen_score", "rejected_score")
    assert got.to_dicts() == expected


def test_consensus(uninterrupted: dict, work: Path) -> None:
    _, out, _ = uninterrupted["consensus"]
    questions = source("consensus", work)
    assert out["qid"].to_list() == questions["qid"].to_list(), "one row per question, in order"
    assert out["n"].to_list() == [3] * questions.height
    for row in out.iter_rows(named=True):
        assert len(row["answers"]) == 3 and len(row["scores"]) == 3
        scored = [s for s in row["scores"] if s is not None]
        if scored:
            assert row["mean_score"] == pytest.approx(sum(scored) / len(scored))
        assert row["agreement"] is None or 1 <= row["agreement"] <= 5
    assert out["agreement"].null_count() < out.height, "the consensus judge answered"
    assert out["consensus"].null_count() < out.height


@pytest.mark.parametrize("name", NAMES)
def test_recipe_killed_mid_run_then_resumed(
    name: str, tmp_path: Path, prefect_api: str, uninterrupted: dict, vllm_server: str, work: Path
) -> None:
    spec = over_http(recipe(name, work, tmp_path / "store"), vllm_server)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    steps = tmp_path / "store" / name / "steps"
    proc = start_cli(["run", str(path)], prefect_api)
    # kill once the first LLM step has written one batch (half of the work is still to do)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(steps.glob("00-*/*.parquet")):
        assert proc.poll() is None, (proc.stdout.read() if proc.stdout else "")[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in steps.rglob("*.parquet")}
    assert done, "the kill must land after some work"
    finished = list(steps.glob("*/manifest.json"))  # a stage writes one once complete
    assert len(finished) < len(build_plan(spec).stages), "the kill must land before the end"

    _, resumed = run(spec)
    for f, identity in done.items():
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == identity, f"{f.name} was recomputed"
    assert resumed.equals(uninterrupted[name][1])
