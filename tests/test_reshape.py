"""Steps that change how many rows there are (``explode``, ``group``) and ``parse_json``:
the operators on frames, then real pipeline runs (real Prefect, real Parquet store) with
several batches and per-step batch sizes, DAG joins across row identities, and
``generate`` samples exploded into rows (fake backend: this is about orchestration).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import start_cli, write_jsonl
from nightshift_testops import Count, read_log

from nightshift import Pipeline, Step
from nightshift.core.errors import NightshiftError, SpecError, StepFailed
from nightshift.flows.cli import main as cli_main
from nightshift.flows.outputs import read_output
from nightshift.flows.pipeline import run_spec
from nightshift.flows.plan import build_plan
from nightshift.ops import Explode, Group, Map, ParseJson
from nightshift.tasks.batches import child_row_ids, group_row_ids
from nightshift.tasks.operators import ROW_ID, apply_operator
from nightshift.tasks.spec import load_spec

FAKE = {"default": {"backend": "fake", "model": "echo"}}


def frame(**columns) -> pl.DataFrame:
    n = len(next(iter(columns.values())))
    return pl.DataFrame({ROW_ID: pl.Series(range(1, n + 1), dtype=pl.UInt64), **columns})


def splitmix(parent: int, index: int) -> int:
    """The documented child id formula, written out in plain Python."""
    mask = (1 << 64) - 1
    z = (parent + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


# -- the row-id rules -----------------------------------------------------------------------


def test_child_ids_follow_the_documented_formula() -> None:
    parents = np.array([0, 1, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    index = np.array([0, 3, 1, 7])
    got = child_row_ids(parents, index).to_list()
    assert got == [splitmix(int(p), int(i)) for p, i in zip(parents, index, strict=True)]
    assert got[0] == 0xE220A8397B1DCDAF  # SplitMix64's first output for seed 0


def test_child_ids_of_many_rows_in_blocks_on_every_core() -> None:
    """Past one block (65,536 ids) the ids are mixed in blocks across threads: every block
    and every edge between two gives the formula's id, for a strided (sliced) input too."""
    rng = np.random.default_rng(7)
    n = 3 * 65_536 + 11
    parents = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    index = rng.integers(0, 50, n)
    got = child_row_ids(pl.Series(parents[::-1]), pl.Series(index[::-1])).to_numpy()
    picks = [0, 1, 65_535, 65_536, 65_537, 2 * 65_536, n - 12, n - 1]
    picks += rng.integers(0, n, 200).tolist()
    for k in picks:
        assert int(got[k]) == splitmix(int(parents[::-1][k]), int(index[::-1][k])), k
    assert len(got) == n


def key_hash(text: str) -> int:
    """The documented group id formula, written out in plain Python."""
    data, mask = text.encode(), (1 << 64) - 1
    a = sum(b * pow(0x100000001B3, i, 1 << 64) for i, b in enumerate(data)) & mask
    b = sum(b * pow(0x9E3779B97F4A7C15, i, 1 << 64) for i, b in enumerate(data)) & mask

    def mix(z: int) -> int:  # SplitMix64's finalizer: splitmix(z - gamma, 0)
        return splitmix((z - 0x9E3779B97F4A7C15) & mask, 0)

    return mix(a ^ mix((b + len(data)) & mask))


def test_group_ids_follow_the_documented_formula() -> None:
    keys = pl.DataFrame({"q": ["What is 2+2?", "", None, "héllo " * 50], "n": [1, 2, 3, None]})
    texts = [
        '{"q":"What is 2+2?","n":1}',
        '{"q":"","n":2}',
        '{"q":null,"n":3}',
        '{"q":"' + "héllo " * 50 + '","n":null}',
    ]
    assert group_row_ids(keys).to_list() == [key_hash(t) for t in texts]


def test_group_ids_depend_on_the_key_only() -> None:
    a = group_row_ids(pl.DataFrame({"q": ["x", "y", None]}))
    b = group_row_ids(pl.DataFrame({"q": ["y", "x", None]}))
    assert a.to_list() == [b[1], b[0], b[2]] and a.n_unique() == 3
    assert group_row_ids(pl.DataFrame({"k": ["x"]}))[0] != a[0]  # the column name counts


# -- explode on frames ------------------------------------------------------------------------


def test_explode_rows_ids_and_empty_lists() -> None:
    df = frame(q=[["a", "b"], None, [], ["c"]], doc=["d1", "d2", "d3", "d4"])
    out = apply_operator(Explode(column="q"), df)
    assert out["q"].to_list() == ["a", "b", "c"]
    assert out["doc"].to_list() == ["d1", "d1", "d4"]
    assert out["_parent_id"].to_list() == [1, 1, 4]
    assert out[ROW_ID].to_list() == [splitmix(1, 0), splitmix(1, 1), splitmix(4, 0)]
    assert out.columns[:2] == [ROW_ID, "_parent_id"]
    kept = apply_operator(Explode(column="q", keep_empty=True), df)
    assert kept["q"].to_list() == ["a", "b", None, None, "c"]
    assert kept["_parent_id"].to_list() == [1, 1, 2, 3, 4]


def test_explode_zipped_unequal_lengths_is_the_rows_error() -> None:
    df = frame(a=[[1, 2], [3], [4, 5], [6]], b=[["x", "y"], ["z"], ["w"], ["v"]])
    out = apply_operator(Explode(columns=["a", "b"], max_error_rate=0.5), df)
    assert out["a"].to_list() == [1, 2, 3, None, 6]
    assert out["b"].to_list() == ["x", "y", "z", None, "v"]
    errors = out["explode_error"].to_list()
    assert errors[3] == "lists of unequal length: a 2, b 1" and errors.count(None) == 4
    with pytest.raises(StepFailed, match=r"1/4 rows failed .* row 3: lists of unequal length"):
        apply_operator(Explode(columns=["a", "b"], max_error_rate=0.2), df)


def test_explode_refuses_a_non_list_column() -> None:
    with pytest.raises(SpecError, match="column 'doc' is String, not a list"):
        apply_operator(Explode(column="doc"), frame(doc=["x"]))


# -- parse_json and group on frames --------------------------------------------------------


def test_parse_json_types_and_row_errors() -> None:
    df = frame(
        r=[
            '{"qs": ["a", "b"], "d": 3, "m": [[1], [2, 3]]}',
            "not json",
            None,
            '{"qs": "a", "d": 1, "m": []}',
            '{"qs": [], "d": 2.5, "m": []}',
            '{"qs": ["z"], "d": 4, "m": [[1]]}',
        ]
    )
    op = ParseJson(
        column="r",
        into={"qs": "list[string]", "d": "int", "m": "list[list[int]]"},
        max_error_rate=0.8,
    )
    out = apply_operator(op, df)
    assert out.schema["qs"] == pl.List(pl.String) and out.schema["m"] == pl.List(pl.List(pl.Int64))
    assert out["qs"].to_list() == [["a", "b"], None, None, None, None, ["z"]]
    assert out["m"].to_list()[0] == [[1], [2, 3]]
    errors = out["r_error"].to_list()
    assert errors[0] is None and errors[2] is None and errors[5] is None
    assert errors[1].startswith("reply is not JSON")
    assert errors[3] == "reply does not match: qs is a string, not a list"
    assert errors[4] == "reply does not match: d is a number, not int"
    with pytest.raises(StepFailed, match="3/5 replies failed to parse"):
        apply_operator(op.model_copy(update={"max_error_rate": 0.5}), df)


def test_parse_json_keeps_the_generate_steps_error() -> None:
    df = frame(r=[None, "{}"], r_error=["timeout", None])
    out = apply_operator(ParseJson(column="r", into={"x": "int"}, max_error_rate=1), df)
    assert out["r_error"].to_list() == ["timeout", "reply has no key 'x'"]


def test_group_aggregates_order_and_ids() -> None:
    df = frame(k=["b", "a", "b", None, "a"], v=[1, 2, 3, 4, 5], s=["x", "y", "x", "z", "w"])
    op = Group(
        by=["k"],
        collect={
            "vs": "list(v)",
            "n": "count()",
            "best": "max(v)",
            "lo": "min(v)",
            "m": "mean(v)",
            "t": "sum(v)",
            "f": "first(s)",
            "l": "last(s)",
            "u": "n_unique(s)",
        },
    )
    state = op.index(df.lazy())
    out = pl.concat([apply_operator(op, df.head(2), state), apply_operator(op, df.tail(3), state)])
    assert out.columns == [ROW_ID, "k", "vs", "n", "best", "lo", "m", "t", "f", "l", "u"]
    assert out["k"].to_list() == ["b", "a", None]
    assert out["vs"].to_list() == [[1, 3], [2, 5], [4]]
    assert out.select("n", "best", "lo", "t", "u").rows() == [
        (2, 3, 1, 4, 1),
        (2, 5, 2, 7, 2),
        (1, 4, 4, 4, 1),
    ]
    assert out["m"].to_list() == [2.0, 3.5, 4.0] and out["f"].to_list() == ["x", "y", "z"]
    assert out["l"].to_list() == ["x", "w", "z"]
    assert out[ROW_ID].to_list() == group_row_ids(out.select("k")).to_list()


# -- pipelines --------------------------------------------------------------------------------


def docs(n: int) -> list[dict]:
    """Documents with a list of 0..4 questions each (row 7: an empty list, row 11: null)."""
    rows = []
    for i in range(n):
        qs = [f"q{i}.{j}" for j in range(i % 5)]
        rows.append(
            {
                "doc": f"d{i}",
                "topic": f"t{i % 3}",
                "qs": None if i == 11 else qs,
                "scores": None if i == 11 else [j * 10 + i for j in range(i % 5)],
            }
        )
    return rows


def spec_dict(
    tmp_path: Path,
    steps: list,
    batch_size: int = 10,
    name: str = "reshape",
    store: str = "store",
    **extra,
) -> dict:
    data = tmp_path / "data" / "docs.jsonl"
    if not data.exists():
        write_jsonl(data, docs(40))
    return {
        "name": name,
        "source": {"path": str(data)},
        "batch_size": batch_size,
        "store": {"url": f"file://{tmp_path / store}"},
        "steps": steps,
        **extra,
    }


def expected_children() -> list[tuple[str, int]]:
    return [(q, s) for r in docs(40) for q, s in zip(r["qs"] or [], r["scores"] or [], strict=True)]


def test_explode_in_a_pipeline_same_ids_for_every_batch_size(tmp_path: Path) -> None:
    steps = [
        {"explode": {"columns": ["qs", "scores"]}},
        {"map": {"columns": {"double": "scores * 2"}, "batch_size": 7}},  # pieces of children
        {"count": {"tag": "after"}},
    ]
    outputs = []
    for size, explode_size in ((10, None), (40, None), (20, 3)):  # 3: the explode cuts pieces
        run_steps = [dict(s) for s in steps]
        if explode_size:
            run_steps[0] = {"explode": {**steps[0]["explode"], "batch_size": explode_size}}
        spec = spec_dict(tmp_path, run_steps, batch_size=size, store=f"store{size}")
        summary = run_spec(load_spec(spec), allow_imports=True)
        if explode_size:  # a 3-row piece exploding to up to 12 rows, cut again in 7s
            rows = {s["name"]: s["units_computed"] for s in summary["steps"]}
            assert rows["00-explode"] == 14 and rows["01-map"] > 2, rows
        out = read_output(build_plan(spec))
        outputs.append(out)
        assert list(zip(out["qs"], out["scores"], strict=True)) == expected_children()
        assert (out["double"] == out["scores"] * 2).all() and out[ROW_ID].is_unique().all()
    assert outputs[0].equals(outputs[1]) and outputs[0].equals(outputs[2])
    first = outputs[0]
    assert first["_parent_id"][0] == (first["_parent_id"][0] >> 32 << 32) + 1  # row 1 of the file
    assert first[ROW_ID][0] == splitmix(first["_parent_id"][0], 0)


def test_group_in_a_pipeline_and_its_status(tmp_path: Path) -> None:
    steps = [
        {"explode": {"columns": ["qs", "scores"]}},
        {
            "group": {
                "by": ["topic"],
                "collect": {
                    "questions": "list(qs)",
                    "n": "count()",
                    "best": "max(scores)",
                    "docs": "n_unique(doc)",
                },
            }
        },
        {"map": {"columns": {"k": "n + 1"}}},
    ]
    spec = spec_dict(tmp_path, steps)
    summary = run_spec(load_spec(spec), allow_imports=True)
    out = read_output(build_plan(spec))
    children = pl.DataFrame(
        [
            {"topic": r["topic"], "q": q, "s": s}
            for r in docs(40)
            for q, s in zip(r["qs"] or [], r["scores"] or [], strict=True)
        ]
    )
    want = children.group_by("topic", maintain_order=True).agg(
        pl.col("q").alias("questions"), pl.len().cast(pl.Int64).alias("n"), pl.col("s").max()
    )
    assert out["topic"].to_list() == want["topic"].to_list() == ["t1", "t2", "t0"]
    assert out["questions"].to_list() == want["questions"].to_list()
    assert (
        out["n"].to_list() == want["n"].to_list() and out["best"].to_list() == want["s"].to_list()
    )
    assert (out["k"] == out["n"] + 1).all()
    assert out[ROW_ID].to_list() == group_row_ids(out.select("topic")).to_list()
    rows = {s["name"]: (s["rows_in"], s["rows_out"]) for s in summary["steps"]}
    n_children = len(expected_children())
    assert rows[next(n for n in rows if n.endswith("explode"))] == (40, n_children)
    assert rows[next(n for n in rows if "group" in n)] == (n_children, 3)


def test_join_across_an_explode(tmp_path: Path) -> None:
    steps = [
        {"map": {"columns": {"nq": "array_length(qs)"}}, "name": "docs"},
        {"explode": {"column": "qs"}, "name": "questions", "after": ["docs"]},
        {
            "map": {"columns": {"answer": "concat('A: ', qs)"}},
            "name": "answers",
            "after": ["questions"],
        },
        {"map": {"columns": {"title": "upper(doc)"}}, "name": "titles", "after": ["docs"]},
        {
            "map": {"columns": {"both": "concat(title, ' ', answer)"}},
            "name": "merged",
            "after": ["titles", "answers"],
        },
    ]
    with pytest.raises(NightshiftError) as info:
        build_plan(spec_dict(tmp_path, steps))
    message = str(info.value)
    assert "\n" not in message and "steps[4] (merged: map)" in message
    assert "'titles'" in message and "'answers'" in message and "join: {ids: answers}" in message
    steps[4]["join"] = {"ids": "answers"}
    spec = spec_dict(tmp_path, steps)
    run_spec(load_spec(spec), allow_imports=True)
    out = read_output(build_plan(spec))
    assert out.height == len(expected_children())
    assert out["both"].to_list() == [
        f"D{i} A: {q}" for i, r in enumerate(docs(40)) for q in r["qs"] or []
    ]
    assert out[ROW_ID].to_list() == read_output(build_plan(spec), step="answers")[ROW_ID].to_list()


def test_generate_samples_exploded_into_rows(tmp_path: Path) -> None:
    steps = [
        {"filter": {"where": "array_length(qs) > 0"}},
        {
            "generate": {
                "prompt": "{{ doc }}",
                "output": "answer",
                "n": 3,
                "temperature": 0.7,
                "batch_size": 4,
            }
        },
        {"explode": {"columns": ["answer", "answer_error", "answer_finish_reason"]}},
    ]
    spec = spec_dict(tmp_path, steps, serving=FAKE)
    run_spec(load_spec(spec), allow_imports=True)
    out = read_output(build_plan(spec))
    kept = [r["doc"] for r in docs(40) if r["qs"]]
    assert out.height == 3 * len(kept)
    assert out["answer"].to_list() == [f"echo: {d}" for d in kept for _ in range(3)]
    assert out.schema["answer"] == pl.String and out["answer_error"].null_count() == out.height
    assert out[ROW_ID].is_unique().all()


def test_parse_json_into_auto_from_the_generate_schema(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "questions": {"type": "array", "items": {"type": "string"}},
            "level": {"type": "integer"},
            "meta": {"type": "object", "properties": {"lang": {"type": "string"}}},
        },
    }
    steps = [
        {"generate": {"prompt": "{{ doc }}", "output": "reply", "json_schema": schema}},
        {"parse_json": {"column": "reply", "into": "auto"}},
        {"explode": {"column": "questions"}},
        {"template": {"output": "p", "template": "{{ questions }} {{ level + 1 }}"}},
    ]
    plan = build_plan(spec_dict(tmp_path, steps, serving=FAKE))
    op = plan.nodes[1].operator
    assert isinstance(op, ParseJson) and op.resolved == schema["properties"]
    out = apply_operator(
        op, frame(reply=['{"questions": ["a"], "level": 2, "meta": {"lang": "en"}}'])
    )
    assert out.schema["questions"] == pl.List(pl.String) and out["level"].to_list() == [2]
    assert out["meta"].to_list() == [{"lang": "en"}]
    bad = spec_dict(
        tmp_path,
        [steps[0] | {"generate": {**steps[0]["generate"], "json_schema": None}}, steps[1]],
        name="bad",
    )
    with pytest.raises(NightshiftError, match=r"steps\[1\] \(parse_json\): into: auto needs"):
        build_plan(bad)


def test_python_api(tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"r": json.dumps({"xs": [1, 2]}), "g": "a"}, {"r": json.dumps({"xs": [3]}), "g": "a"}],
    )
    pipe = Pipeline(
        "api",
        source=str(data),
        store=f"file://{tmp_path / 's'}",
        batch_size=1,
        steps=[
            ParseJson(column="r", into={"xs": "list[int]"}),
            Explode(column="xs"),
            Step(Group(by=["g"], collect={"xs": "list(xs)", "total": "sum(xs)"}), name="g"),
            Map(columns={"t2": "total * 2"}),
        ],
    )
    pipe.run()
    out = pipe.read()
    assert out.select("g", "xs", "total", "t2").rows() == [("a", [1, 2, 3], 6, 12)]
    joined = Pipeline(
        "api-join",
        source=str(data),
        store=f"file://{tmp_path / 's'}",
        steps=[
            Step(ParseJson(column="r", into={"xs": "list[int]"}), name="parsed"),
            Step(Explode(column="xs"), name="xs"),
            Step(Map(columns={"g2": "concat(g, '!')"}), name="upper", after=["parsed"]),
            Step(Map(columns={"y": "xs * 10"}), after=["upper", "xs"], join={"ids": "xs"}),
        ],
    )
    out = joined.read() if joined.run() else None
    assert out is not None and out.select("xs", "g2", "y").rows() == [
        (1, "a!", 10),
        (2, "a!", 20),
        (3, "a!", 30),
    ]


def test_change_after_an_explode_recomputes_only_what_follows(
    tmp_path: Path, test_log: Path
) -> None:
    def steps(after: str) -> list:
        return [
            {"count": {"tag": "before"}},
            {"explode": {"column": "qs"}},
            {"count": {"tag": "mid"}},
            {"map": {"columns": {"x": after}}},
            {"count": {"tag": "end"}},
        ]

    spec = spec_dict(tmp_path, steps("'one'"), fuse=False)
    run_spec(load_spec(spec), allow_imports=True)
    assert sorted({e["tag"] for e in read_log(str(test_log))}) == ["before", "end", "mid"]
    test_log.write_text("")
    summary = run_spec(
        load_spec(spec_dict(tmp_path, steps("'two'"), fuse=False)), allow_imports=True
    )
    assert [e["tag"] for e in read_log(str(test_log))] == ["end"] * 4
    computed = {s["name"]: s["computed"] for s in summary["steps"]}
    assert [computed[n] for n in sorted(computed)] == [0, 0, 0, 4, 4]
    assert Count  # the test operators are registered by importing them


# -- what the CLI and the UI show --------------------------------------------------------------


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> str:
    """``nightshift ARGS`` through its entry point, in this process; its stdout."""
    monkeypatch.setattr(sys, "argv", ["nightshift", *args])
    capsys.readouterr()
    cli_main()
    return capsys.readouterr().out


def test_status_export_preview_and_artifacts_know_the_new_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    steps = [
        {"explode": {"column": "qs"}, "name": "questions"},
        {"group": {"by": ["topic"], "collect": {"qs": "list(qs)", "n": "count()"}}, "name": "g"},
    ]
    spec = tmp_path / "reshape.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(tmp_path, steps, name="Re_Shape", fuse=False)))
    n_children = len([q for r in docs(40) for q in r["qs"] or []])
    status = cli(monkeypatch, capsys, "status", str(spec))
    assert "0/4" in status and "rows in" in status and "rows out" in status, status
    summary = run_spec(load_spec(str(spec)))
    status = cli(monkeypatch, capsys, "status", str(spec))
    line = next(x for x in status.splitlines() if "explode" in x)
    assert "4/4" in line and " 40 " in line and f" {n_children} " in line, status
    line = next(x for x in status.splitlines() if "group" in x)
    assert "4/4" in line and f" {n_children} " in line and line.rstrip(" │").endswith("3"), status

    out = tmp_path / "questions.parquet"
    cli(monkeypatch, capsys, "export", str(spec), "--to", str(out), "--step", "questions")
    exported = pl.read_parquet(out)
    assert exported.height == n_children and exported.columns[:2] == [ROW_ID, "_parent_id"]
    assert exported["qs"].to_list() == [q for r in docs(40) for q in r["qs"] or []]

    shown = cli(monkeypatch, capsys, "preview", str(spec), "--rows", "2")
    assert "t1" in shown and "t2" in shown, shown  # the groups of the first rows

    found = artifacts(summary["flow_run_id"])
    table = found["re-shape-summary"].data
    rows = {r["step"]: r for r in (json.loads(table) if isinstance(table, str) else table)}
    assert (rows["00-explode"]["rows in"], rows["00-explode"]["rows out"]) == (
        "40",
        f"{n_children:,}",
    )
    assert (rows["01-group"]["rows in"], rows["01-group"]["rows out"]) == (f"{n_children:,}", "3")
    sample = found["re-shape-sample"].data
    header = next(line for line in sample.splitlines() if line.startswith("| "))
    assert set(header.strip("| ").split(" | ")) == {"topic", "qs", "n"}, header  # no _row_id
    assert "| t1 |" in sample and "q1.0" in sample


def artifacts(flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


# -- SIGKILL, then run again: the same output ----------------------------------------------------


def crash_spec(tmp_path: Path, store: str, sleep: float = 0.2) -> Path:
    """``sleep``: the counted steps' seconds per batch (the kill's window; the reference
    needs none, and ``sleep`` changes no output)."""
    steps = [
        {"nightshift_testops:Count": {"tag": "a", "sleep": sleep}},
        {"explode": {"columns": ["qs", "scores"]}},
        {"nightshift_testops:Count": {"tag": "mid", "sleep": sleep}},
        {"group": {"by": ["topic"], "collect": {"qs": "list(qs)", "best": "max(scores)"}}},
        {"map": {"columns": {"k": "best + 1"}}},
    ]
    spec = spec_dict(
        tmp_path, steps, batch_size=4, name="crash", store=store, fuse=False, max_in_flight=2
    )
    path = tmp_path / f"{store}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stored_starts(store: Path, step_dir: str) -> set[int]:
    starts = set()
    for f in (store / "crash" / "steps" / step_dir).glob("*.parquet"):
        try:
            pl.read_parquet_schema(f)
        except Exception:
            continue
        starts.add(int(f.stem.rsplit("-", 2)[1]))
    return starts


def test_sigkill_mid_run_with_explode_and_group_then_resume(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = crash_spec(tmp_path, "store")
    log = tmp_path / "crash-log.jsonl"
    for tag, count in (("a", 3), ("mid", 3)):  # two kills: before and after the explode
        proc = start_cli(["run", str(spec), "--allow-imports"], prefect_api, log)
        deadline = time.monotonic() + 240
        while sum(e["tag"] == tag and e["pid"] == proc.pid for e in read_log(str(log))) < count:
            assert proc.poll() is None, f"run ended before the kill:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_a = stored_starts(tmp_path / "store", "00-count")
    assert 0 < len(done_a) < 10, done_a

    monkeypatch.setenv("NIGHTSHIFT_TEST_LOG", str(log))  # the re-run, in this process
    run_spec(load_spec(str(spec)), allow_imports=True)
    redone = {
        (e["first"] & 0xFFFFFFFF) // 4 * 4
        for e in read_log(str(log))
        if e["pid"] == os.getpid() and e["tag"] == "a"
    }
    assert not redone & done_a, (
        f"batches done before the kill were computed again: {redone & done_a}"
    )
    resumed = read_output(build_plan(str(spec), allow_imports=True))

    reference = crash_spec(tmp_path, "reference", sleep=0.0)
    run_spec(load_spec(str(reference)), allow_imports=True)
    expected = read_output(build_plan(str(reference), allow_imports=True))
    assert resumed.equals(expected)
    assert resumed["topic"].to_list() == ["t1", "t2", "t0"] and resumed[ROW_ID].is_unique().all()
    for step_dir in ("01-explode", "02-count", "03-group"):
        a = pl.concat(
            [
                pl.read_parquet(f)
                for f in sorted(
                    (tmp_path / "store" / "crash" / "steps" / step_dir).glob("*.parquet")
                )
            ]
        )
        b = pl.concat(
            [
                pl.read_parquet(f)
                for f in sorted(
                    (tmp_path / "reference" / "crash" / "steps" / step_dir).glob("*.parquet")
                )
            ]
        )
        assert sorted(a[ROW_ID].to_list()) == sorted(b[ROW_ID].to_list()), step_dir
