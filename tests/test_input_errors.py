"""Bad input stops before any work with one clear line naming the place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import make_rows, run_cli, write_jsonl
from flows.plan import build_plan
from tasks.errors import NightshiftError


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


def test_missing_file(tmp_path: Path) -> None:
    expect(tmp_path, spec(tmp_path, source={"path": str(tmp_path / "nope.jsonl")}), "nope.jsonl", "no such file")


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


def test_unwritable_store(tmp_path: Path, data: Path) -> None:
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: make the root a file instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("not a directory")
        expect(tmp_path, spec(tmp_path, store={"url": f"file://{locked}/store"}), "not writable", str(locked))
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


@pytest.mark.parametrize("extra, place", [
    ({"serving": {"default": {"backend": "openai_compatible", "api_key": "sk-live-123"}}},
     "serving.default.api_key"),
    ({"store": {"url": "s3://bucket/x", "storage_options": {"secret": "s3cr3t"}}},
     "store.storage_options.secret"),
    ({"source": {"path": "s3://bucket/x.jsonl", "storage_options": {"key": "AKIA123"}}},
     "source.storage_options.key"),
])
def test_secrets_in_a_spec_are_refused(extra: dict, place: str) -> None:
    from flows.spec import load_spec

    spec = {"name": "p", "source": {"path": "x.jsonl"}, "steps": [{"select": {"columns": ["a"]}}]}
    with pytest.raises(NightshiftError) as err:
        load_spec({**spec, **extra})
    message = str(err.value)
    assert message.startswith(f"spec: {place}: a spec is shown in the Prefect UI"), message
    assert "sk-live-123" not in message and "s3cr3t" not in message and "AKIA123" not in message
