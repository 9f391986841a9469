"""The ``nightshift`` CLI: run, status, export end to end on a CSV source; usage errors,
``--help`` and ``--version`` (one line, exit 2, no Prefect or polars imported); a vLLM
engine start in one log line."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import polars as pl

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
        "  - filter: {where: \"n >= 10\"}\n"
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
        pl.DataFrame(rows).filter(pl.col("n") >= 10).unique("text", keep="first", maintain_order=True)
    )
    assert [r["id"] for r in lines] == expected["id"].to_list()
    assert lines[0]["question"] == f"Say {lines[0]['text']}"
    assert "prompt" not in lines[0]
    assert f"wrote {len(lines)} rows" in exported.stdout

    bad = run_cli(["export", str(spec), "--to", str(tmp_path / "out.csv")], prefect_api)
    assert bad.returncode == 2 and "use a .parquet or .jsonl" in bad.stderr


def test_run_table_shows_tokens_and_cost_only_for_llm_runs(capsys: pytest.CaptureFixture) -> None:
    from nightshift.flows.cli import _print_steps

    row = dict(name="00-generate", batches=2, cached=0, reused=0, computed=2, failed=0,
               rows_in=10, rows_out=10, prompt_tokens=512, completion_tokens=77, cost_usd=0.0123)
    _print_steps([row])
    out = capsys.readouterr().out
    assert "tokens in" in out and "512" in out and "77" in out and "0.0123" in out
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
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    stderr, _, marker = proc.stderr.rpartition("\n@@heavy ")
    assert marker, proc.stderr[-2000:]
    return proc.returncode, proc.stdout, stderr, json.loads(marker)


@pytest.mark.parametrize("args", [
    ["bogus"],                                   # NoSuchCommand
    ["--bogus"],                                 # NoSuchOption
    ["run"],                                     # MissingParameter
    ["run", "spec.yaml", "--batch-size", "x"],   # BadParameter
    ["export", "spec.yaml"],                     # missing --to
    ["preview", "spec.yaml", "--rows", "many"],
], ids=lambda a: " ".join(a))
def test_usage_error_is_one_line_and_exit_2(args: list[str]) -> None:
    code, out, err, heavy = _probe(args)
    assert code == 2, err
    assert "Traceback" not in err and "╭" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    # at most the usage line and the --help hint besides the error itself
    assert len(lines) <= 3 and all(
        line.startswith(("error: ", "Usage: nightshift", "Try 'nightshift")) for line in lines), err
    assert out == ""
    assert heavy == [], f"a usage error imported {heavy}"


def test_no_arguments_prints_the_help_and_exits_2() -> None:
    code, out, err, heavy = _probe([])
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


# -- a vLLM engine start logs one line --------------------------------------------------


@dataclass
class _LoggingConfig:  # stands in for vllm.config.logging.LoggingConfig
    log_level: str = "INFO"


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stand-in ``vllm`` (with ``vllm.config.logging``) and ``torch`` modules: ``LLM``
    records its kwargs and serves nothing; ``fail`` in the kwargs makes it raise."""
    from nightshift.serving import vllm_backend

    calls: list[dict] = []

    class LLM:
        def __init__(self, **kwargs: object) -> None:
            calls.append(kwargs)
            if str(kwargs.get("model", "")).endswith("broken"):
                raise RuntimeError("model type 'x' not supported\nsee the docs")
            config = types.SimpleNamespace(max_model_len=64, dtype="torch.float32")
            self.llm_engine = types.SimpleNamespace(
                model_config=config, engine_core=types.SimpleNamespace(shutdown=lambda: None))

        def get_tokenizer(self) -> object:
            return types.SimpleNamespace(chat_template=None)

    vllm = types.ModuleType("vllm")
    vllm.__path__ = []  # type: ignore[attr-defined]
    vllm.LLM = LLM  # type: ignore[attr-defined]
    vllm.__version__ = "stand-in"  # type: ignore[attr-defined]
    config = types.ModuleType("vllm.config")
    config.__path__ = []  # type: ignore[attr-defined]
    logging_config = types.ModuleType("vllm.config.logging")
    logging_config.LoggingConfig = _LoggingConfig  # type: ignore[attr-defined]
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
    for name, module in {"vllm": vllm, "vllm.config": config, "vllm.config.logging": logging_config,
                         "vllm.triton_utils": None, "torch": torch}.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("NIGHTSHIFT_LOG_LEVEL", "VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL",
                 "VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE", "VLLM_CACHE_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(vllm_backend, "_NOISE_FILTERED", False)
    with warnings.catch_warnings():  # the quiet start's warning filters stay in this test
        yield calls


def _engine_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("vLLM engine:")]


def test_engine_start_is_one_line_and_vllm_logs_errors_only(
    fake_vllm: list[dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nightshift.serving.vllm_backend import VLLMBackend

    caplog.set_level(logging.INFO, logger="nightshift.serving")
    with VLLMBackend(str(tmp_path), max_model_len=64) as backend:
        pass
    [line] = _engine_lines(caplog)
    assert line.levelno == logging.INFO and "\n" not in line.getMessage()
    assert f"vLLM engine: {tmp_path} (float32, max_model_len 64, cpu, vLLM stand-in) started in " \
        in line.getMessage()
    [kwargs] = fake_vllm
    assert kwargs["logging_config"].log_level == "ERROR" and kwargs["use_tqdm_on_load"] is False
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    # quieting changes what is printed, not the engine: not in the engine options
    assert "logging_config" not in backend.engine_options
    assert "use_tqdm_on_load" not in backend.engine_options


def test_engine_start_verbose_or_user_level_keeps_vllm_logging(
    fake_vllm: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nightshift.serving.vllm_backend import VLLMBackend

    monkeypatch.setenv("NIGHTSHIFT_LOG_LEVEL", "debug")  # what --verbose sets
    VLLMBackend(str(tmp_path)).close()
    assert "logging_config" not in fake_vllm[-1] and "use_tqdm_on_load" not in fake_vllm[-1]
    assert "TORCH_CPP_LOG_LEVEL" not in os.environ

    monkeypatch.delenv("NIGHTSHIFT_LOG_LEVEL")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # the user's own vLLM level wins
    VLLMBackend(str(tmp_path)).close()
    assert "logging_config" not in fake_vllm[-1] and fake_vllm[-1]["use_tqdm_on_load"] is False

    VLLMBackend(str(tmp_path), engine_kwargs={"use_tqdm_on_load": True}).close()  # given: kept
    assert fake_vllm[-1]["use_tqdm_on_load"] is True


def test_engine_start_failure_says_why_in_one_line(
    fake_vllm: list[dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nightshift.serving.vllm_backend import VLLMBackend

    caplog.set_level(logging.INFO, logger="nightshift.serving")
    with pytest.raises(RuntimeError, match="not supported"):  # the engine's own error
        VLLMBackend(str(tmp_path / "broken"))
    [line] = _engine_lines(caplog)
    assert line.levelno == logging.ERROR
    assert line.getMessage().endswith("model type 'x' not supported see the docs")
    assert "failed to start after" in line.getMessage()
