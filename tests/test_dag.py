"""Steps as a DAG (``name:``/``after:``): linear specs keep their keys, validate's one-line
errors, three translations as branches (fake backend: this is about orchestration) with a
change to one branch and ``resume_step`` by name, a SIGKILL mid-branch, and a property test
of random DAG shapes against the equivalent linear chain.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import zlib
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import make_rows, start_cli, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nightshift_testops import Count, read_log

from nightshift import Pipeline, Step
from nightshift.core.errors import NightshiftError, SpecError
from nightshift.core.fingerprints import digest
from nightshift.flows.cli import main as cli_main
from nightshift.flows.outputs import read_output
from nightshift.flows.pipeline import run_spec
from nightshift.flows.plan import build_plan
from nightshift.tasks.operators import ROW_ID, Filter, Translate, apply_operator
from nightshift.tasks.spec import load_spec

FAKE = {"default": {"backend": "fake", "model": "echo"}}


def spec_dict(tmp_path: Path, steps: list[dict], **extra) -> dict:
    data = tmp_path / "data" / "rows.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(40))
    return {
        "name": "dag",
        "source": {"path": str(data)},
        "batch_size": 10,
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "steps": steps,
        **extra,
    }


# -- linear specs keep their keys ---------------------------------------------------------

LINEAR = [
    {"map": {"columns": {"m": "n * 2"}}},
    {"filter": {"where": "n % 3 <> 0"}},  # fused with map
    {"dedup": {"on": ["text"]}},  # a barrier
    {"template": {"output": "p", "template": "{{ text }}"}},
    {"map": {"columns": {"k": "m + 1"}, "batch_size": 4}},  # pieces
    {"filter": {"where": "k > 3"}},
]


def test_linear_spec_keys_and_layout_unchanged_by_names_and_after(tmp_path: Path) -> None:
    implicit = build_plan(spec_dict(tmp_path, LINEAR))
    names = ["m", "f", "d", "t", "k", "last"]
    named = [{**s, "name": n} for s, n in zip(LINEAR, names, strict=True)]
    chained = [{**s, "after": [names[i - 1]] if i else []} for i, s in enumerate(named)]
    for steps in (named, chained):
        plan = build_plan(spec_dict(tmp_path, steps))
        assert plan.linear and plan.sinks == [len(plan.stages) - 1]
        assert [s.dirname for s in plan.stages] == [s.dirname for s in implicit.stages]
        assert [s.fingerprint for s in plan.stages] == [s.fingerprint for s in implicit.stages]
        assert plan.keys == implicit.keys and plan.barrier_keys == implicit.barrier_keys
        assert [plan.stage_dir(s.index) for s in plan.stages] == [
            implicit.stage_dir(s.index) for s in implicit.stages
        ]
        # one numbering: a step is numbered as its stage (k is 03-map)
        assert plan.stage_of_step("k") == implicit.stage_of_step(3) == 3
    # the layout and keys a linear spec always had: NN-<ops> and the chained formula
    assert [s.dirname for s in implicit.stages] == [
        "00-map+filter",
        "01-dedup",
        "02-template",
        "03-map",
        "04-filter",
    ]
    assert implicit.stages[0].label == "00-map+filter"  # task runs: the stage's name
    ops = implicit.spec.operators()
    fp0 = ops[1].fingerprint(ops[0].fingerprint("source", {"serving": {}}), {"serving": {}})
    assert implicit.stages[0].fingerprint == fp0
    assert implicit.keys[0] == [
        digest(fp0, implicit.source_key(b)) for b in range(len(implicit.batches))
    ]
    prefix = ""
    for b, key in enumerate(implicit.keys[0]):
        prefix = digest(prefix, key)
        assert implicit.keys[1][b] == digest(implicit.stages[1].fingerprint, prefix)
    assert implicit.keys[2] == [digest(implicit.stages[2].fingerprint, k) for k in implicit.keys[1]]
    assert sorted(implicit.keys) == [0, 1, 2]  # pieces: known once their input's rows are


# -- validate ------------------------------------------------------------------------------


def m(col: str, expr: str = "n", **step) -> dict:
    return {"map": {"columns": {col: expr}}, **step}


BAD = [
    (
        [
            m("a", name="a", after=["c"]),
            m("b", name="b", after=["a"]),
            m("c", name="c", after=["b"]),
        ],
        "steps form a cycle: a -> b -> c -> a",
    ),
    (
        [m("a"), m("b", name="x", after=["mapp"])],
        "steps[1] (x).after: no step is named 'mapp' (steps: map, x)",
    ),
    ([m("a", name="x"), m("b", name="x")], "steps[1]: duplicate step name 'x'"),
    (
        [m("a"), m("b"), m("a", name="m2", after=["map"])],
        None,
    ),  # map-2 is the default name of steps[1]; m2 is free: valid (fork, no join)
    (
        [
            m("base", name="base"),
            m("y", "n + 1", name="l", after=["base"]),
            m("y", "n + 2", name="r", after=["base"]),
            m("z", name="j", after=["l", "r"]),
        ],
        "steps[3] (j: map): steps 'l' and 'r' both write column 'y' and meet in this join",
    ),
    (
        [
            m("a", name="l"),
            m("b", name="r", after=[]),
            {"dedup": {"on": ["text"]}, "after": ["l", "r"]},
        ],
        "steps[2] (dedup): a barrier step (dedup) cannot be a join (after l, r)",
    ),
    (
        [m("a"), {"dedup": {"on": ["text"]}, "after": []}],
        "steps[1] (dedup): a barrier step (dedup) cannot be a step that reads the source",
    ),
    (
        [
            m("a", name="l"),
            m("b", name="r", after=[]),
            m(
                "c",
                name="j",
                after=["l", "r"],
            )
            | {"map": {"columns": {"c": "n"}, "batch_size": 3}},
        ],
        "steps[2] (j: map).batch_size: a join runs on whole batches",
    ),
]


def test_validate_rejects_bad_dags_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for steps, message in BAD:
        if message is None:
            build_plan(spec_dict(tmp_path, steps))
            continue
        with pytest.raises(SpecError) as caught:
            build_plan(spec_dict(tmp_path, steps))
        assert str(caught.value).startswith(message), str(caught.value)
        assert "\n" not in str(caught.value)
    # the command line (its entry point, in this process): one line, exit 2, nothing run
    path = tmp_path / "join.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, BAD[4][0])))
    monkeypatch.setattr(sys, "argv", ["nightshift", "validate", str(path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli_main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "steps 'l' and 'r' both write column 'y'" in lines[0], lines
    assert not (tmp_path / "store" / "dag" / "steps").exists()


# -- three translations -----------------------------------------------------------------


def translations(tmp_path: Path, de: str = "German", merge: bool = True) -> Pipeline:
    data = tmp_path / "data" / "tri.jsonl"
    if not data.exists():  # a rewritten file is a new file (new keys)
        write_jsonl(data, make_rows(30))
    steps: list = [Filter(where="n % 4 <> 3")]
    for tag, language in (("fr", "French"), ("de", de), ("es", "Spanish")):
        steps.append(Step(Count(tag=tag, sleep=0.1), name=f"count-{tag}", after=["filter"]))
        steps.append(Step(Translate(input="text", to=language, output=tag), name=tag))
    if merge:
        steps.append(Step(Count(tag="merge"), name="merge", after=["fr", "de", "es"]))
    return Pipeline(
        "tri",
        source=str(data),
        steps=steps,
        store=f"file://{tmp_path / 'store'}",
        batch_size=10,
        serving=FAKE,
        workers=4,
        max_in_flight=12,
    )


def by_stage(summary: dict) -> dict[str, tuple[int, int]]:
    return {r["name"]: (r["reused"], r["computed"]) for r in summary["steps"]}


def test_three_translations_as_branches(tmp_path: Path, test_log: Path) -> None:
    pipe = translations(tmp_path)
    plan = pipe.plan()
    # a DAG's steps by their names, numbered as everywhere (task runs, logs, artifacts)
    assert [s.name for s in plan.stages] == [
        "00-filter",
        "01-count-fr",
        "02-fr",
        "03-count-de",
        "04-de",
        "05-count-es",
        "06-es",
        "07-merge",
    ]
    assert [s.parents for s in plan.stages][-1] == [2, 4, 6]
    # each branch's keys depend on its ancestors only
    other = translations(tmp_path / "other", de="Italian").plan()
    same = [s.name for s in plan.stages if s.fingerprint == other.stages[s.index].fingerprint]
    assert same == ["00-filter", "01-count-fr", "02-fr", "03-count-de", "05-count-es", "06-es"]

    first = pipe.run()
    assert set(by_stage(first).values()) == {(0, 3)}
    out = pipe.read()
    assert out.height == 23 and out[ROW_ID].is_unique().all()
    assert out["fr"].str.contains("French").all() and out["de"].str.contains("German").all()
    assert out["es"].str.contains("Spanish").all()
    assert out["text"].to_list() == [r["text"] for r in make_rows(30) if r["n"] % 4 != 3]
    log = read_log(str(test_log))
    assert sorted(e["tag"] for e in log) == sorted(["fr", "de", "es", "merge"] * 3)
    spans = {t: [(e["start"], e["end"]) for e in log if e["tag"] == t] for t in ("fr", "de", "es")}
    overlaps = sum(
        a0 < b1 and b0 < a1
        for t, u in (("fr", "de"), ("de", "es"), ("fr", "es"))
        for a0, a1 in spans[t]
        for b0, b1 in spans[u]
    )
    assert overlaps > 0, f"branches ran one after the other: {spans}"
    assert [s.done for s in pipe.status(step="de")] == [3]

    # a change to one branch recomputes that branch and the join, nothing else
    changed = translations(tmp_path, de="Italian")
    second = changed.run()
    stages = by_stage(second)
    assert stages.pop("04-de") == (0, 3) and stages.pop("07-merge") == (0, 3)
    assert set(stages.values()) == {(3, 0)}, stages
    assert [e["tag"] for e in read_log(str(test_log))[12:]] == ["merge"] * 3
    after = changed.read()
    assert after["de"].str.contains("Italian").all()
    assert after["fr"].equals(out["fr"]) and after["es"].equals(out["es"])

    # resume_step by name: that step and what depends on it
    third = changed.run(resume_step="de")
    stages = by_stage(third)
    assert stages.pop("04-de") == (0, 3) and stages.pop("07-merge") == (0, 3)
    assert set(stages.values()) == {(3, 0)}, stages
    assert [e["tag"] for e in read_log(str(test_log))[15:]] == ["merge"] * 3
    assert changed.read(step="fr")["fr"].equals(out["fr"])
    exported = tmp_path / "es.jsonl"
    assert changed.export(exported, step="es") == 23

    # several sinks: export needs a step, and says which
    with pytest.raises(NightshiftError, match=r"3 steps have nothing after them \(fr, de, es\)"):
        translations(tmp_path, merge=False).read()


# -- a SIGKILL mid-branch -----------------------------------------------------------------

BATCH = 25


def crash_spec(tmp_path: Path, store: str) -> Path:
    data = tmp_path / "data" / "crash.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(150, dup_every=7))
    spec = {
        "name": "crash",
        "source": {"path": str(data)},
        "batch_size": BATCH,
        "store": {"url": f"file://{tmp_path / store}"},
        "fuse": False,
        "workers": 2,
        "max_in_flight": 4,
        "steps": [
            {"filter": {"where": "n % 5 <> 0"}},
            {"nightshift_testops:Count": {"tag": "a", "sleep": 0.15}, "name": "a"},
            {
                "nightshift_testops:Count": {"tag": "b", "sleep": 0.3},
                "name": "b",
                "after": ["filter"],
            },
            {"map": {"columns": {"m": "n * 3"}}, "name": "join", "after": ["a", "b"]},
        ],
    }
    path = tmp_path / f"{store}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def completed(store: Path, dirs: dict[str, str]) -> dict[str, set[int]]:
    """Per counted step, the batch starts whose output file is in the store and readable."""
    done: dict[str, set[int]] = {}
    for tag, dirname in dirs.items():
        starts = set()
        for f in (store / "crash" / "steps" / dirname).glob("*.parquet"):
            try:
                pl.read_parquet_schema(f)
            except Exception:
                continue
            starts.add(int(f.stem.rsplit("-", 2)[1]))
        done[tag] = starts
    return done


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> str:
    """``nightshift ARGS`` through its entry point, in this process; its stdout."""
    monkeypatch.setattr(sys, "argv", ["nightshift", *args])
    capsys.readouterr()
    cli_main()
    return capsys.readouterr().out


def test_sigkill_mid_branch_then_resume(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    spec = crash_spec(tmp_path, "store")
    plan = build_plan(str(spec), allow_imports=True)
    dirs = {t: plan.stages[plan.stage_of_step(t)].dirname for t in ("a", "b")}
    assert dirs == {"a": "01-count", "b": "b"}  # the trunk keeps its linear name
    log = tmp_path / "crash-log.jsonl"
    proc = start_cli(["run", str(spec), "--allow-imports"], prefect_api, log)
    deadline = time.monotonic() + 240
    while True:  # kill once branch b has done 3 batches: mid-branch
        if sum(e["tag"] == "b" for e in read_log(str(log))) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        assert proc.poll() is None, f"run ended before the kill:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    before = completed(tmp_path / "store", dirs)
    assert 0 < len(before["b"]) < 6, before

    monkeypatch.setenv("NIGHTSHIFT_TEST_LOG", str(log))  # the re-run, in this process
    resumed = run_spec(load_spec(str(spec)), allow_imports=True)
    assert {r["name"]: r["failed"] for r in resumed["steps"]} == dict.fromkeys(
        ["00-filter", "01-a", "02-b", "03-join"], 0
    )
    first_id = zlib.crc32(str(tmp_path / "data" / "crash.jsonl").encode()) << 32
    for entry in read_log(str(log)):
        if entry["pid"] == os.getpid():  # the re-run's computations
            start = (entry["first"] - first_id) // BATCH * BATCH
            assert start not in before[entry["tag"]], f"completed {entry} recomputed"
    assert completed(tmp_path / "store", dirs) == {t: set(range(0, 150, BATCH)) for t in dirs}

    reference = load_spec(str(crash_spec(tmp_path, "ref-store")))
    run_spec(reference, allow_imports=True)
    got = read_output(build_plan(str(spec), allow_imports=True))
    want = read_output(build_plan(reference, allow_imports=True))
    assert got.equals(want) and got.height == 120

    # status and export by step name; export defaults to the sink (the join)
    status = cli(monkeypatch, capsys, "status", str(spec), "--step", "b", "--allow-imports")
    assert " 02-b " in status and "6/6" in status and "01-count" not in status, status
    out = tmp_path / "out.parquet"
    cli(monkeypatch, capsys, "export", str(spec), "--to", str(out), "--allow-imports")
    assert pl.read_parquet(out).equals(got)
    cli(
        monkeypatch, capsys, "export", str(spec), "--to", str(out), "--step", "a", "--allow-imports"
    )
    assert pl.read_parquet(out).columns == [ROW_ID, "id", "text", "n", "seen_a"]


# -- random DAG shapes against the equivalent linear chain ---------------------------------


@st.composite
def dags(draw: st.DrawFn) -> list[dict]:
    """Cheap map/filter/dedup steps with random parents (a final join of every sink)."""
    steps: list[dict] = []
    for i in range(draw(st.integers(2, 5))):
        after = sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(i, 2)))) if i else []
        size = draw(st.sampled_from([None, None, 8]))
        kind = draw(
            st.sampled_from(["map", "filter", "dedup"] if len(after) == 1 else ["map", "filter"])
        )
        if kind == "map":
            op = {"map": {"columns": {f"c{i}": f"n * {i + 2} + {len(after)}"}}}
        elif kind == "filter":
            op = {"filter": {"where": f"n % {draw(st.integers(3, 7))} <> {i % 3}"}}
        else:  # a barrier inside a branch (the texts are unique: it keeps every row)
            op = {"dedup": {"on": ["text"]}}
        if size and len(after) < 2 and kind != "dedup":
            next(iter(op.values()))["batch_size"] = size
        steps.append({**op, "name": f"s{i}", "after": [f"s{a}" for a in after]})
    parents = {a for s in steps for a in s["after"]}
    sinks = [s["name"] for s in steps if s["name"] not in parents]
    if len(sinks) > 1:
        steps.append({"map": {"columns": {"end": "n"}}, "name": "end", "after": sinks})
    return steps


@settings(
    max_examples=4,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=dags())
def test_random_dags_equal_their_linear_chain(
    tmp_path_factory: pytest.TempPathFactory, steps: list[dict]
) -> None:
    tmp_path = tmp_path_factory.mktemp("dag")
    spec = load_spec(spec_dict(tmp_path, steps, batch_size=20, fuse=True))
    run_spec(spec)
    got = read_output(build_plan(spec))
    # the linear chain: every step in spec order over the whole source, in one frame
    frame = pl.read_ndjson(tmp_path / "data" / "rows.jsonl").with_row_index(ROW_ID)
    frame = frame.with_columns(
        pl.col(ROW_ID).cast(pl.UInt64)
        + (zlib.crc32(str(tmp_path / "data" / "rows.jsonl").encode()) << 32)
    )
    for op in spec.operators():
        frame = apply_operator(op, frame)
    want = frame.select(sorted(frame.columns))
    assert got.select(sorted(got.columns)).equals(want), steps
