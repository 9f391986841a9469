"""``near_dedup``: clusters of near-duplicates, keep-first in source order, batch-size
independence, mark mode, resume without recomputing, and bad config at validate."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest
from conftest import run_cli, write_jsonl

from nightshift import ops
from nightshift.core.errors import NightshiftError
from nightshift.flows.pipeline import Pipeline
from nightshift.flows.plan import build_plan
from nightshift.tasks.operators import ROW_ID, apply_operator
from nightshift.tasks.operators.near_dedup import NearDedup, cluster_roots

WORDS = [
    "river",
    "stone",
    "lamp",
    "garden",
    "quiet",
    "morning",
    "paper",
    "window",
    "violin",
    "copper",
    "harbor",
    "meadow",
    "lantern",
    "signal",
    "orchard",
    "velvet",
    "thunder",
    "pocket",
    "marble",
    "canyon",
    "ribbon",
    "saddle",
    "falcon",
]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 12))).capitalize() + "."


def planted(n_originals: int = 40, seed: int = 1) -> tuple[list[str], list[int]]:
    """Texts and their cluster: originals of 2-3 sentences, some with variants (casing,
    whitespace, one typo, sentences swapped), in a shuffled order."""
    rng = random.Random(seed)
    rows: list[tuple[str, int]] = []
    for c in range(n_originals):
        sents = [sentence(rng) for _ in range(rng.randint(2, 3))]
        text = " ".join(sents)
        rows.append((text, c))
        if c % 2 == 0:
            rows.append((text.upper(), c))
            rows.append(("  ".join(text.split(" ")) + "\n", c))
            i = rng.randrange(len(text))
            rows.append((text[:i] + "z" + text[i + 1 :], c))
            rows.append((" ".join([*sents[1:], sents[0]]), c))
    rng.shuffle(rows)
    return [t for t, _ in rows], [c for _, c in rows]


def frame(texts: list[str | None]) -> pl.DataFrame:
    ids = [(3 << 32) + 1000 - i for i in range(len(texts))]  # ids NOT in source order
    return pl.DataFrame({ROW_ID: ids, "text": texts}, schema={ROW_ID: pl.UInt64, "text": pl.String})


def test_keeps_the_first_row_of_each_cluster_in_source_order() -> None:
    texts, clusters = planted()
    df = frame(list(texts))
    op = NearDedup(column="text")
    out = apply_operator(op, df, op.index(df.lazy()))
    kept = [clusters[texts.index(t)] for t in out["text"]]
    first_of_each = []
    for i, c in enumerate(clusters):
        if c not in clusters[:i]:
            first_of_each.append(i)
    assert sorted(kept) == sorted(set(clusters)), "one row per cluster"
    assert out["text"].to_list() == [texts[i] for i in first_of_each], "the first, in order"
    assert out.columns == [ROW_ID, "text"]


def test_mark_writes_the_cluster_id_and_drops_nothing() -> None:
    texts, clusters = planted(seed=2)
    df = frame([*texts, None, None, ""])
    op = ops.NearDedup(column="text", mark="cluster")
    out = apply_operator(op, df, op.index(df.lazy()))
    assert out.height == df.height and out.columns == [ROW_ID, "text", "cluster"]
    ids = df[ROW_ID].to_list()
    for i, c in enumerate(clusters):
        first = next(j for j, cc in enumerate(clusters) if cc == c)
        assert out["cluster"][i] == ids[first], (i, texts[i])
    # a null text is never a duplicate (its own cluster); one empty text is kept
    assert out["cluster"].to_list()[-3:] == ids[-3:]


def test_same_result_for_any_batch_size_and_only_earlier_rows_matter() -> None:
    texts, _ = planted(seed=3)
    df = frame(list(texts))
    op = NearDedup(column="text", mark="cluster")
    state = op.index(df.lazy())
    whole = apply_operator(op, df, state)
    for size in (1, 7, 50):
        parts = [apply_operator(op, df.slice(i, size), state) for i in range(0, df.height, size)]
        assert pl.concat(parts).equals(whole)
    # rows 0..k decide the same with or without the rows after them
    k = df.height // 2
    head = df.head(k)
    assert apply_operator(op, head, op.index(head.lazy())).equals(whole.head(k))


def test_cluster_roots_follow_chains() -> None:
    import numpy as np

    parents = np.array([-1, 0, 1, -1, 2, 3, -1])
    assert cluster_roots(parents).tolist() == [0, 0, 0, 3, 0, 3, 6]


def test_non_text_column_is_refused_at_validate(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"n": i, "text": f"t{i}"} for i in range(5)])
    with pytest.raises(NightshiftError, match=r"steps\[1\] \(near_dedup\).*'n' is Int64, not text"):
        build_plan(spec(tmp_path, {"column": "n"}))


def spec(tmp_path: Path, config: dict, batch_size: int = 10) -> dict:
    return {
        "name": "nd",
        "source": {"path": str(tmp_path / "data" / "*.jsonl")},
        "batch_size": batch_size,
        "store": {"url": f"file://{tmp_path}/store"},
        "steps": [{"map": {"columns": {"k": "text"}}}, {"near_dedup": config}],
    }


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (
            {"column": "k", "threshold": 1.5},
            "steps[1].near_dedup.threshold: Input should be less than or equal to 1",
        ),
        (
            {"column": "k", "ngram": 0},
            "steps[1].near_dedup.ngram: Input should be greater than or equal to 1",
        ),
        (
            {"column": "k", "num_perm": 8},
            "steps[1].near_dedup.num_perm: Input should be greater than or equal to 16",
        ),
        ({"column": "nope"}, "steps[1] (near_dedup): missing column nope"),
        ({"threshold": 0.5}, "steps[1].near_dedup.column: Field required"),
    ],
)
def test_bad_config_is_one_line_naming_the_step(
    tmp_path: Path, config: dict, fragment: str
) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": "a b c"}])
    with pytest.raises(NightshiftError) as info:
        build_plan(spec(tmp_path, config))
    assert "\n" not in str(info.value)
    assert fragment in str(info.value), str(info.value)


def test_cli_validate_refuses_a_threshold_outside_0_1(tmp_path: Path, prefect_api: str) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": "a b c"}])
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: x\nsource: {{path: '{tmp_path}/data/*.jsonl'}}\nstore: {{url: 'file://{tmp_path}/s'}}\n"
        "steps:\n  - map: {columns: {k: text}}\n  - near_dedup: {column: k, threshold: 0}\n"
    )
    result = run_cli(["validate", str(path)], prefect_api)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "steps[1].near_dedup.threshold" in lines[0], result.stderr
    assert "greater than 0" in lines[0] and "Traceback" not in result.stderr


def test_pipeline_across_files_and_batch_sizes_then_resume_recomputes_nothing(
    tmp_path: Path,
) -> None:
    texts, clusters = planted(n_originals=60, seed=4)
    half = len(texts) // 2
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "data" / "a.jsonl", rows[:half])
    write_jsonl(tmp_path / "data" / "b.jsonl", rows[half:])
    outputs = []
    for batch_size in (7, 1000):
        pipe = Pipeline(
            f"nd{batch_size}",
            source=str(tmp_path / "data" / "*.jsonl"),
            steps=[ops.Select(columns=["id", "text"]), ops.NearDedup(column="text")],
            store=f"file://{tmp_path}/store",
            batch_size=batch_size,
        )
        first = pipe.run()
        outputs.append(pipe.read())
        stored = {
            f: f.stat().st_mtime_ns
            for f in (tmp_path / "store" / f"nd{batch_size}").rglob("*.parquet")
            if "runs" not in f.parts  # each run records itself (flows/recording.py)
        }
        assert any("barriers" in f.parts for f in stored), "the index is in the store"
        again = pipe.run()
        assert [s["computed"] for s in again["steps"]] == [0, 0], again["steps"]
        after = {
            f: f.stat().st_mtime_ns
            for f in (tmp_path / "store" / f"nd{batch_size}").rglob("*.parquet")
            if "runs" not in f.parts  # each run records itself (flows/recording.py)
        }
        assert after == stored, "the re-run rewrote nothing, the index included"
        assert pipe.read().equals(outputs[-1])
        assert first["steps"][-1]["rows_in"] == len(texts)
    assert outputs[0].equals(outputs[1])
    expected = [i for i, c in enumerate(clusters) if c not in clusters[:i]]
    assert outputs[0]["id"].to_list() == expected
