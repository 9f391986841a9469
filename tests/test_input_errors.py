"""Bad input stops before any work with one clear line naming the place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import ROOT, cli_env, make_rows, run_cli, write_jsonl

from nightshift.core.errors import NightshiftError
from nightshift.flows.plan import build_plan


def spec(tmp_path: Path, **overrides) -> dict:
    base = {
        "name": "bad",
        "source": {"path": str(tmp_path / "data" / "*.jsonl")},
        "batch_size": 10,
        "store": {"url": f"file://{tmp_path}/store"},
        "steps": [{"filter": {"where": "length(text) > 3"}}, {"map": {"columns": {"m": "n * 2"}}}],
    }
    base.update(overrides)
    return base


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(30))


def expect(tmp_path: Path, spec_dict: dict, *fragments: str) -> str:
    with pytest.raises(NightshiftError) as info:
        build_plan(spec_dict)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "store" / "bad" / "steps").exists(), "no step may run"
    return message


def test_a_local_model_folder_that_is_not_there(tmp_path: Path, data: Path) -> None:
    expect(
        tmp_path,
        spec(
            tmp_path,
            serving={"default": {"backend": "vllm", "model": str(tmp_path / "nope")}},
            steps=[{"generate": {"prompt": "{{ text }}", "output": "o"}}],
        ),
        "serving.default: model ",
        "nope: no such folder",
    )


def test_missing_file(tmp_path: Path) -> None:
    expect(
        tmp_path,
        spec(tmp_path, source={"path": str(tmp_path / "nope.jsonl")}),
        "nope.jsonl",
        "no such file",
    )


def test_glob_matching_nothing(tmp_path: Path) -> None:
    expect(tmp_path, spec(tmp_path), "no file matches")


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, data: Path) -> None:
    bad = tmp_path / "data" / "b.jsonl"
    bad.write_text('{"id": "x", "text": "fine", "n": 1}\n\n{"id": "y", "text": "broken", "n": 2\n')
    expect(tmp_path, spec(tmp_path), "b.jsonl line 3", "invalid JSON")


def test_missing_column(tmp_path: Path, data: Path) -> None:
    s = spec(tmp_path, steps=[{"map": {"columns": {"m": "length(txt)"}}}])
    expect(tmp_path, s, "steps[0] (map)", "txt")


def test_missing_column_in_template(tmp_path: Path, data: Path) -> None:
    s = spec(tmp_path, steps=[{"template": {"output": "p", "template": "{{ body }}"}}])
    expect(tmp_path, s, "steps[0] (template)", "missing column body")


def test_wrong_type_in_filter(tmp_path: Path, data: Path) -> None:
    s = spec(tmp_path, steps=[{"filter": {"where": "text > 5"}}])
    expect(tmp_path, s, "steps[0] (filter)", "cannot compare string with numeric")


def test_unknown_operator(tmp_path: Path, data: Path) -> None:
    s = spec(tmp_path, steps=[{"map": {"columns": {"m": "n"}}}, {"fliter": {"where": "n > 1"}}])
    expect(tmp_path, s, "steps[1]", "unknown operator 'fliter'", "filter")


def test_bad_operator_config_key_path(tmp_path: Path, data: Path) -> None:
    s = spec(tmp_path, steps=[{"filter": {"wher": "n > 1"}}])
    expect(tmp_path, s, "steps[0].filter")


def test_batch_size_must_be_positive(tmp_path: Path, data: Path) -> None:
    for size in (0, -5):
        expect(tmp_path, spec(tmp_path, batch_size=size), "batch_size", "greater than 0")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"batch_size": True}, "spec: batch_size: expected an integer, got true (a boolean)"),
        ({"retries": False}, "spec: retries: expected an integer, got false (a boolean)"),
        ({"max_in_flight": "8"}, "spec: max_in_flight: expected an integer, got '8' (a string)"),
        ({"batch_size": 2.5}, "spec: batch_size: expected an integer, got 2.5 (a float)"),
        ({"retry_delay_seconds": True}, "spec: retry_delay_seconds: expected a number, got true"),
        (
            {"task_runner": "dask", "dask": {"n_workers": True}},
            "spec: dask.n_workers: expected an integer, got true (a boolean)",
        ),
        (
            {"steps": [{"filter": {"where": "n > 1", "batch_size": True}}]},
            "steps[0].filter.batch_size: expected an integer, got true (a boolean)",
        ),
        (
            {"steps": [{"generate": {"prompt": "{{ text }}", "output": "o", "max_tokens": True}}]},
            "steps[0].generate.max_tokens: expected an integer, got true (a boolean)",
        ),
        (
            {"steps": [{"judge": {"input": "text", "rubric": "r", "output": "s", "max": True}}]},
            "steps[0].judge.max: expected an integer, got true (a boolean)",
        ),
        (
            {"steps": [{"generate": {"prompt": "x", "output": "o", "temperature": True}}]},
            "steps[0].generate.temperature: expected a number, got true (a boolean)",
        ),
    ],
)
def test_booleans_are_not_numbers(
    tmp_path: Path, data: Path, overrides: dict, fragment: str
) -> None:
    """``batch_size: true`` was read as 1; every integer field of a spec takes integers
    only, every number field numbers only (an integer is one, a boolean is not)."""
    expect(tmp_path, spec(tmp_path, **overrides), fragment)


def test_whole_numbers_still_pass_where_a_float_is_asked(tmp_path: Path, data: Path) -> None:
    plan = build_plan(spec(tmp_path, retry_delay_seconds=3, batch_size=15))
    assert plan.spec.retry_delay_seconds == 3.0 and len(plan.batches) == 2


def test_cli_batch_size_true_in_yaml_exits_2(tmp_path: Path, data: Path, prefect_api: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: x\nsource: {{path: '{tmp_path}/data/*.jsonl'}}\nbatch_size: true\n"
        "steps:\n  - map: {columns: {m: 'n'}}\n"
    )
    result = run_cli(["validate", str(path)], prefect_api)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: {path}: batch_size: expected an integer, got true (a boolean)"
    )


def test_a_spec_too_large_for_a_flow_run_parameter_is_one_line(
    tmp_path: Path, data: Path, prefect_api: str
) -> None:
    """Prefect's server refuses flow-run parameters over 512 KiB (HTTP 422): validate says
    so (this process's limit), and a run against a server whose limit is lower than ours
    ends in the same line, exit 2, instead of a raw PrefectHTTPStatusError at exit 1."""
    columns = {f"c{i}": "n * 2 + 1000000000000000" for i in range(20_000)}  # ~700 KB of JSON
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, steps=[{"map": {"columns": columns}}])))

    checked = run_cli(["validate", str(path)], prefect_api)
    assert checked.returncode == 2, checked.stderr[-2000:]
    line = checked.stderr.strip()
    assert "\n" not in line and line.startswith(
        f"error: {path}: too large to be a Prefect flow-run parameter: "
    ), line
    assert "at most 524,288 (PREFECT_SERVER_API_MAX_PARAMETER_SIZE)" in line, line
    assert "the largest part is steps[0].map.columns (" in line, line

    # no limit here (the check above passes), the session's server keeps its default
    env = {**cli_env(prefect_api), "PREFECT_SERVER_API_MAX_PARAMETER_SIZE": "0"}
    ran = subprocess.run(
        [sys.executable, "-m", "nightshift.flows.cli", "run", str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = ran.stdout + ran.stderr
    assert ran.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "PrefectHTTPStatusError" not in output, output[-3000:]
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith("error: spec: too large to be a Prefect flow-run parameter: "), last
    assert "at most 524,288" in last and "steps[0].map.columns" in last, last
    assert not (tmp_path / "store" / "bad" / "steps").exists(), "no step may run"


def test_unwritable_store(tmp_path: Path, data: Path) -> None:
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: make the root a file instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("not a directory")
        expect(
            tmp_path,
            spec(tmp_path, store={"url": f"file://{locked}/store"}),
            "not writable",
            str(locked),
        )
    finally:
        if locked.is_dir():
            locked.chmod(0o700)


def test_import_paths_need_permission(tmp_path: Path, data: Path) -> None:
    s = spec(tmp_path, steps=[{"os:system": {}}])
    expect(tmp_path, s, "steps[0]", "import path", "--allow-imports")


def test_cli_bad_yaml_names_line_and_exits_2(tmp_path: Path, prefect_api: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nsource: {path: a.jsonl\nsteps: []\n")
    result = run_cli(["validate", str(path)], prefect_api)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {path}:")
    assert "invalid YAML" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_key_path_in_yaml(tmp_path: Path, data: Path, prefect_api: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: x\nsource: {{path: '{tmp_path}/data/*.jsonl'}}\nstore: {{url: 'file://{tmp_path}/s'}}\n"
        "steps:\n  - map: {columns: {m: 'n'}}\n  - dedup: {on: text}\n"
    )
    result = run_cli(["run", str(path)], prefect_api)
    assert result.returncode == 2, result.stderr
    assert "steps[1].dedup.on" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "x" / "steps").exists()


@pytest.mark.parametrize(
    "extra, place",
    [
        (
            {"serving": {"default": {"backend": "openai_compatible", "api_key": "sk-live-123"}}},
            "serving.default.api_key",
        ),
        (
            {"store": {"url": "s3://bucket/x", "storage_options": {"secret": "s3cr3t"}}},
            "store.storage_options.secret",
        ),
        (
            {"source": {"path": "s3://bucket/x.jsonl", "storage_options": {"key": "AKIA123"}}},
            "source.storage_options.key",
        ),
    ],
)
def test_secrets_in_a_spec_are_refused(extra: dict, place: str) -> None:
    from nightshift.tasks.spec import load_spec

    spec = {"name": "p", "source": {"path": "x.jsonl"}, "steps": [{"select": {"columns": ["a"]}}]}
    with pytest.raises(NightshiftError) as err:
        load_spec({**spec, **extra})
    message = str(err.value)
    assert message.startswith(f"spec: {place}: a spec is shown in the Prefect UI"), message
    assert "sk-live-123" not in message and "s3cr3t" not in message and "AKIA123" not in message


# -- bad input that used to pass silently, mislead, or hang (issue 10) ---------------------


def write_spec(path: Path, spec_dict: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    return path


def one_error_line(result) -> str:
    """The CLI failed the way a user should see it: exit 2, ``error: ...`` in one line."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    return last


@pytest.mark.parametrize(
    "step",
    [
        {"map": {"columns": {"_row_id": "n * 2"}}},
        {"template": {"output": "_row_id", "template": "{{ text }}"}},
    ],
)
def test_a_step_writing_row_id_is_refused(tmp_path: Path, data: Path, step: dict) -> None:
    name = next(iter(step))
    message = expect(
        tmp_path,
        spec(tmp_path, steps=[{"filter": {"where": "n > 1"}}, step]),
        f"steps[1] ({name})",
        "writes the reserved column _row_id",
    )
    assert "another name" in message


def test_duplicate_yaml_key_names_the_key_and_line(tmp_path: Path, data: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: bad\nsource: {{path: '{tmp_path}/data/*.jsonl'}}\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\nsteps:\n"
        "  - map: {columns: {n2: 'n * 2', n2: 'n * 3'}}\n"
    )
    message = expect(tmp_path, str(path), f"{path}:5:", "duplicate key 'n2'", "line 5")
    assert "invalid YAML" in message
    # a YAML merge key overriding a value is not a duplicate
    path.write_text(
        f"name: bad\nsource: {{path: '{tmp_path}/data/*.jsonl'}}\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\nsteps:\n"
        "  - map: {columns: &c {m: 'n'}}\n  - map: {columns: {<<: *c, m: 'n * 2'}}\n"
    )
    assert build_plan(str(path)).spec.steps[1] == {"map": {"columns": {"m": "n * 2"}}}


def test_jsonl_column_changing_type_names_the_line(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"text {i}", "n": i} for i in range(49)]
    rows.insert(37, {"id": 99, "text": "odd one", "n": "forty"})
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    message = expect(
        tmp_path,
        spec(tmp_path),
        "a.jsonl line 38",
        "column 'n'",
        "a string",
        "a number on line 1",
        "source.schema",
    )
    assert "Traceback" not in message


def test_declared_schema_converts_or_names_the_bad_value(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"text {i}", "n": i} for i in range(49)] + [
        {"id": "x-49", "text": "string id", "n": 49}
    ]
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    steps = [{"map": {"columns": {"m": "n * 2"}}}]
    plan = build_plan(
        spec(
            tmp_path,
            steps=steps,
            source={
                "path": str(tmp_path / "data" / "*.jsonl"),
                "schema": {"id": "string", "n": "integer"},
            },
        )
    )
    staged = pl.read_parquet(plan.batches[0].read_uri)
    assert staged.schema["id"] == pl.String and staged.schema["n"] == pl.Int64
    assert staged["id"].to_list()[:2] == ["0", "1"] and staged["id"][-1] == "x-49"

    # the same file declared the other way round: the string id cannot be an integer
    bad = spec(
        tmp_path,
        steps=steps,
        source={"path": str(tmp_path / "data" / "*.jsonl"), "schema": {"id": "integer"}},
    )
    expect(tmp_path, bad, "a.jsonl line 50", "column 'id'", "'x-49' is not a valid integer")
    # a declared column that a file lacks, and an unknown type name
    expect(
        tmp_path,
        spec(
            tmp_path,
            source={
                "path": str(tmp_path / "data" / "*.jsonl"),
                "schema": {"id": "string", "idd": "string"},
            },
        ),
        "a.jsonl",
        "no column 'idd'",
        "source.schema",
    )
    expect(
        tmp_path,
        spec(
            tmp_path, source={"path": str(tmp_path / "data" / "*.jsonl"), "schema": {"id": "strng"}}
        ),
        "source.schema",
        "unknown type 'strng'",
    )


@pytest.mark.parametrize(
    "second, fragments",
    [
        (
            [{"id": i, "text": f"t {i}", "n": i} for i in range(5)],
            ["column 'id' is String in", "a.jsonl but Int64 in", "b.jsonl", "source.schema"],
        ),
        (
            [{"id": f"b{i}", "text": f"t {i}", "n": i, "extra": 1} for i in range(5)],
            ["b.jsonl: column 'extra' is not in", "a.jsonl", "same columns"],
        ),
        (
            [{"id": f"b{i}", "text": f"t {i}"} for i in range(5)],
            ["b.jsonl: no column 'n'", "same columns"],
        ),
    ],
)
def test_files_of_one_glob_must_agree(
    tmp_path: Path, data: Path, second: list, fragments: list
) -> None:
    write_jsonl(tmp_path / "data" / "b.jsonl", second)
    expect(tmp_path, spec(tmp_path), *fragments)


def test_wide_file_validates_and_runs_quickly(tmp_path: Path) -> None:
    """5 rows x 10,000 columns: column bookkeeping must be O(columns) (it took 90-225 s)."""
    import time

    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Filter, Map, Select, Template

    rows = [{"text": f"row {i} text", **{f"c{j}": j + i for j in range(10_000)}} for i in range(5)]
    write_jsonl(tmp_path / "data" / "wide.jsonl", rows)
    steps = [
        Filter(where="length(text) > 3"),
        Map(columns={"n": "length(text)"}),
        Template(output="p", template="Hi {{ text }} {{ c9999 }}"),
        Select(columns=["text", "n", "p"]),
    ]
    pipe = Pipeline(
        "wide",
        source=str(tmp_path / "data" / "wide.jsonl"),
        steps=steps,
        store=f"file://{tmp_path}/store",
    )
    cpu = time.process_time()
    pipe.plan()  # validate: staging, the dry run, the sample rendering
    planning = time.process_time() - cpu
    cpu = time.process_time()
    pipe.run()
    running = time.process_time() - cpu
    out = pipe.read()
    assert out["p"].to_list() == [f"Hi row {i} text {9999 + i}" for i in range(5)]
    assert planning < 10 and running < 20, (planning, running)  # was ~20 s and ~70 s of CPU


@pytest.mark.parametrize("template", ["{{ 'x' | upper }}", "{{ 'x' }}{{ n | string }}"])
def test_template_without_columns_is_valid(tmp_path: Path, data: Path, template: str) -> None:
    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Template

    pipe = Pipeline(
        "const",
        source=str(data),
        steps=[Template(output="p", template=template)],
        store=f"file://{tmp_path}/store",
        batch_size=10,
    )
    pipe.run()
    got = pipe.read()["p"].to_list()
    assert got[0].startswith("X" if "upper" in template else "x0") and len(got) == 30


@pytest.mark.parametrize(
    "template, fragments",
    [
        ("{{ text.title_case }}", ["undefined", "'str object' has no attribute 'title_case'"]),
        ("{{ text.__class__.__mro__ }}", ["blocked by the sandbox", "__class__"]),
        ("{{ n + text }}", ["TypeError", "unsupported operand"]),
    ],
)
def test_validate_renders_templates_on_real_rows(
    tmp_path: Path, data: Path, template: str, fragments: list
) -> None:
    steps = [
        {"map": {"columns": {"m": "n * 2"}}},
        {"template": {"output": "p", "template": template}},
    ]
    expect(
        tmp_path,
        spec(tmp_path, steps=steps),
        "steps[1] (template)",
        "a.jsonl",
        "fails on row 1",
        *fragments,
    )


@pytest.mark.parametrize("safe", [True, False])
def test_steps_safe_on_sample_run_on_the_sample(tmp_path: Path, data: Path, safe: bool) -> None:
    """``Operator.safe_on_sample`` decides whether validate runs a step on the sample
    rows: a safe custom step's output reaches the template after it (which fails on it);
    an unsafe one ends the sample (validate cannot see the template's problem)."""
    from nightshift.tasks.operators import Operator, register_operator

    class Tag(Operator):
        name = f"tag_{'safe' if safe else 'unsafe'}"
        safe_on_sample = safe

        def writes(self) -> list[str]:
            return ["tag"]

        def process(self, df: pl.DataFrame) -> pl.DataFrame:
            return df.with_columns(pl.lit("x").alias("tag"))

    register_operator(Tag)
    steps = [{Tag.name: {}}, {"template": {"output": "p", "template": "{{ tag.title_case }}"}}]
    if safe:
        expect(tmp_path, spec(tmp_path, steps=steps), "steps[1] (template)", "fails on row 1")
    else:
        assert len(build_plan(spec(tmp_path, steps=steps)).stages) == 1


def test_llm_prompt_templates_are_rendered_by_validate(tmp_path: Path, data: Path) -> None:
    steps = [{"generate": {"prompt": "Summarize {{ text.body }}", "output": "s"}}]
    serving = {
        "default": {
            "backend": "openai_compatible",
            "base_url": "http://127.0.0.1:9/v1",
            "model": "m",
        }
    }
    expect(
        tmp_path,
        spec(tmp_path, steps=steps, serving=serving),
        "steps[0] (generate)",
        "has no attribute 'body'",
    )


def test_template_failing_at_run_time_is_one_line_naming_step_and_row(tmp_path: Path) -> None:
    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Template

    rows = make_rows(12)
    rows[8]["text"] = None  # past the rows validate renders on
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    pipe = Pipeline(
        "late",
        source=str(tmp_path / "data" / "a.jsonl"),
        steps=[Template(output="p", template="{{ text.upper() }}")],
        store=f"file://{tmp_path}/store",
        batch_size=4,
    )
    pipe.plan()  # the first rows render: validate passes
    with pytest.raises(Exception) as info:
        pipe.run()
    message = str(info.value)
    assert "\n" not in message
    for fragment in (
        "batch 3/3",
        "steps[0] (template)",
        "row 9 of its source file",
        "_row_id",
        "'None' has no attribute 'upper'",
    ):
        assert fragment in message, message
    assert len(list((tmp_path / "store" / "late" / "steps").rglob("*.parquet"))) == 2  # kept


def test_source_path_that_is_a_directory_or_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    expect(
        tmp_path,
        spec(tmp_path, source={"path": str(tmp_path / "data")}),
        "is a directory, not a file",
        "/*.jsonl",
    )
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    expect(
        tmp_path,
        spec(tmp_path, source={"path": str(tmp_path / "loop1")}),
        "loop1",
        "a symlink loop",
    )
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    expect(
        tmp_path,
        spec(tmp_path, source={"path": str(tmp_path / "dangling.jsonl")}),
        "a symlink to",
        "gone.jsonl",
        "does not exist",
    )


@pytest.mark.parametrize("path", ["s3://bucket/data/a.jsonl", "s3://bucket/data/*.jsonl"])
def test_unreachable_s3_endpoint_is_a_connection_error(tmp_path: Path, path: str) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    # one attempt (botocore retries a refused connection with backoff: ~5-10 s a case)
    retries = {"retries": {"max_attempts": 1, "mode": "standard"}}
    options = {"endpoint_url": endpoint, "anon": True, "config_kwargs": retries}
    source = {"path": path, "storage_options": options}
    message = expect(
        tmp_path, spec(tmp_path, source=source), "cannot connect to endpoint", endpoint
    )
    assert "no such file" not in message and "no file matches" not in message


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("a.jsonl", b"\n\n  \n", ["a.jsonl: the file is empty", "only blank lines"]),
        ("a.jsonl", b"", ["a.jsonl: the file is empty", "0 bytes"]),
        ("a.csv", b"\n\n", ["a.csv: the file is empty"]),
        (
            "a.csv",
            b'id,text,n\nr0,"fine",1\nr1,"broken,2\nr2,ok,3\n',
            ["a.csv line 3", "bad CSV", "unclosed quote"],
        ),
        ("a.csv", b'id,text,n\nr0,fine,1\nr1,"odd"quote,2\n', ["a.csv line 3", "bad CSV"]),
        (
            "a.csv",
            b"id,text,n\nr0,fine,1\nr1,fine\nr2,ok,3\n",
            ["a.csv line 3", "bad CSV", "2 field(s), the header has 3"],
        ),
        (
            "a.csv",
            b"id,text,n\nr0,fine,1\nr1,fine,2,extra\n",
            ["a.csv line 3", "4 field(s), the header has 3"],
        ),
    ],
)
def test_bad_text_files_say_what_and_where(
    tmp_path: Path, name: str, content: bytes, fragments: list
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).write_bytes(content)
    message = expect(
        tmp_path, spec(tmp_path, source={"path": str(tmp_path / "data" / name)}), *fragments
    )
    assert "could not infer" not in message and "TapeError" not in message


def test_valid_control_bom_blank_lines_and_schema_through_the_cli(
    tmp_path: Path, prefect_api: str
) -> None:
    """A valid control: BOM-prefixed JSONL and CSV with blank lines, a declared schema,
    validate, run and export (twice: the second export replaces the first whole)."""
    (tmp_path / "data").mkdir()
    lines = [f'{{"id": {i}, "text": "text number {i}", "n": {i}}}' for i in range(6)]
    (tmp_path / "data" / "a.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "\n\n".join(lines).encode() + b"\n"
    )
    csv_rows = "\n".join(f"{10 + i},csv text {i},{i}" for i in range(4))
    (tmp_path / "data" / "b.csv").write_bytes(
        b"\xef\xbb\xbfid,text,n\n" + csv_rows.encode() + b"\n\n"
    )
    source = {
        "path": [str(tmp_path / "data" / "a.jsonl"), str(tmp_path / "data" / "b.csv")],
        "schema": {"id": "string"},
    }
    path = write_spec(
        tmp_path / "spec.yaml",
        spec(
            tmp_path,
            source=source,
            steps=[
                {"filter": {"where": "length(text) > 3"}},
                {
                    "template": {
                        "output": "p",
                        "template": "{{ 'id' | upper }} {{ id }}: {{ text }}",
                    }
                },
            ],
        ),
    )
    checked = run_cli(["validate", str(path)], prefect_api)
    assert checked.returncode == 0 and "ok: 2 file(s)" in checked.stdout, checked.stderr[-2000:]
    ran = run_cli(["run", str(path)], prefect_api)
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = tmp_path / "out.parquet"
    for _ in range(2):
        exported = run_cli(["export", str(path), "--to", str(out)], prefect_api)
        assert exported.returncode == 0 and "wrote 10 rows" in exported.stdout, exported.stderr[
            -2000:
        ]
    got = pl.read_parquet(out)
    assert got["id"].to_list() == [str(i) for i in range(6)] + [str(10 + i) for i in range(4)]
    assert got["p"][0] == "ID 0: text number 0"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_failed_export_keeps_the_earlier_file_and_says_one_line(
    tmp_path: Path, data: Path, prefect_api: str
) -> None:
    path = write_spec(tmp_path / "spec.yaml", spec(tmp_path))
    assert run_cli(["run", str(path)], prefect_api).returncode == 0
    out = tmp_path / "out.parquet"
    assert run_cli(["export", str(path), "--to", str(out)], prefect_api).returncode == 0
    good = out.read_bytes()

    # a step output damaged on disk (its footer still reads): the export fails midway
    outputs = sorted((tmp_path / "store" / "bad" / "steps").rglob("*.parquet"))
    damaged = outputs[-1]
    raw = bytearray(damaged.read_bytes())
    raw[4:40] = b"\xff" * 36  # the first page header, after the PAR1 magic
    damaged.write_bytes(bytes(raw))
    line = one_error_line(run_cli(["export", str(path), "--to", str(out)], prefect_api))
    assert f"export --to {out}" in line and "left as it was" in line, line
    assert out.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    # the case: a second file whose id type differs is refused before any write
    damaged.unlink()
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"id": i, "text": "t", "n": i} for i in range(3)])
    line = one_error_line(run_cli(["export", str(path), "--to", str(out)], prefect_api))
    assert "column 'id' is String in" in line and "b.jsonl" in line, line
    assert out.read_bytes() == good


# -- steps that change rows: explode, parse_json, group, joins across row identities -------

RESHAPE_ERRORS = {
    "explode_non_list": (
        [{"explode": {"column": "text"}}],
        ["steps[0] (explode)", "column 'text' is String, not a list"],
    ),
    "parse_json_unknown_type": (
        [{"parse_json": {"column": "text", "into": {"a": "integr"}}}],
        ["steps[0].parse_json.into", "unknown type 'integr'"],
    ),
    "group_missing_column": (
        [
            {"map": {"columns": {"m": "n"}}},
            {"group": {"by": ["nope"], "collect": {"c": "count()"}}},
        ],
        ["steps[1] (group)", "missing column nope"],
    ),
    "group_unknown_aggregate": (
        [
            {"map": {"columns": {"m": "n"}}},
            {"group": {"by": ["text"], "collect": {"c": "median(n)"}}},
        ],
        ["steps[1].group", "unknown aggregate 'median'"],
    ),
    "join_across_identities": (
        [
            {"map": {"columns": {"m": "n"}}, "name": "base"},
            {"explode": {"column": "xs"}, "name": "ex"},
            {"map": {"columns": {"k": "n"}}, "name": "other", "after": ["base"]},
            {"map": {"columns": {"z": "k"}}, "name": "j", "after": ["other", "ex"]},
        ],
        ["steps[3] (j: map)", "'other'", "'ex'", "join: {ids: ex}"],
    ),
}


@pytest.fixture
def list_data(tmp_path: Path) -> Path:
    rows = [{**r, "xs": list(range(r["n"] % 3))} for r in make_rows(30)]
    return write_jsonl(tmp_path / "data" / "a.jsonl", rows)


@pytest.mark.parametrize("case", sorted(RESHAPE_ERRORS))
def test_reshape_steps_bad_input(tmp_path: Path, list_data: Path, case: str) -> None:
    steps, fragments = RESHAPE_ERRORS[case]
    expect(tmp_path, spec(tmp_path, steps=steps), *fragments)


def test_cli_validate_reshape_steps_bad_input(
    tmp_path: Path, list_data: Path, prefect_api: str
) -> None:
    """``nightshift validate``: exit 2, one line naming the step, for each case."""
    for case, (steps, fragments) in sorted(RESHAPE_ERRORS.items()):
        path = tmp_path / f"{case}.yaml"
        path.write_text(json.dumps(spec(tmp_path, steps=steps)))  # JSON is YAML
        result = run_cli(["validate", str(path)], prefect_api)
        assert result.returncode == 2, (case, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, lines
        for fragment in fragments:
            assert fragment in lines[0], (case, lines[0])
    assert not (tmp_path / "store" / "bad" / "steps").exists()
