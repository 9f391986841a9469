"""How long the run report takes to build from a long run's records.

A 5-step pipeline (filter, generate, judge, filter, generate) over N batches; its store
holds synthetic records of three attempts, as runs write them (``flows/recording.py``):
the first killed at 40% (its records still in 30-second chunks, never compacted), the
second failed at 80% (20 failed units), the third resumed and completed (the earlier
units reused). Each stage's outputs are real Parquet files (8 per stage, what the data
charts sample). Timed: reading the records (``load_records``), building the HTML
(``build_report``) and the whole ``write_report``; the baseline is the same report of a
100-batch run, in the same process.

    python benchmarks/bench_report.py                  # 100 and 10,000 batches
    python benchmarks/bench_report.py --batches 1000 --results ''
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl
from rich.console import Console
from rich.table import Table

from nightshift.flows.plan import Plan, build_plan
from nightshift.flows.recording import attempt_id, load_records, records_frame
from nightshift.flows.report import build_report, vega_bundle, write_report

SAMPLE_FILES = 8


def make_plan(root: Path, batches: int) -> Plan:
    data = root / "data.jsonl"
    with open(data, "w") as handle:
        for i in range(batches):
            handle.write(
                json.dumps({"id": i, "text": f"document {i} " + "lorem " * (i % 40)}) + "\n"
            )
    spec = {
        "name": "bench",
        "source": {"path": str(data)},
        "store": {"url": f"file://{root}/store"},
        "batch_size": 1,
        "serving": {"default": {"backend": "fake", "model": "echo"}},
        "steps": [
            {"filter": {"where": "length(text) > 5"}},
            {"generate": {"prompt": "Q: {{ text }}", "output": "answer"}},
            {"judge": {"input": "answer", "rubric": "helpful", "output": "score"}},
            {"filter": {"where": "score >= 1"}},
            {"generate": {"prompt": "Sum: {{ answer }}", "output": "summary"}},
        ],
    }
    return build_plan(spec)


def write_outputs(plan: Plan) -> None:
    rng = random.Random(1)
    n = 200
    frame = pl.DataFrame(
        {
            "_row_id": list(range(n)),
            "id": list(range(n)),
            "text": [f"document {i} " + "lorem " * rng.randint(0, 40) for i in range(n)],
            "answer": ["answer " * rng.randint(1, 80) for _ in range(n)],
            "answer_error": [None] * n,
            "score": [rng.randint(1, 5) for _ in range(n)],
            "score_raw": ["3"] * n,
            "summary": ["summary " * rng.randint(1, 30) for _ in range(n)],
        },
        schema_overrides={"answer_error": pl.String},
    )
    for stage in range(len(plan.stages)):
        directory = Path(plan.stage_dir(stage))
        directory.mkdir(parents=True, exist_ok=True)
        for k in range(SAMPLE_FILES):
            frame.write_parquet(directory / f"sample-{k}.parquet")


def write_records(plan: Plan) -> int:
    """Three attempts' records; returns how many unit records were written."""
    rng = random.Random(2)
    n = len(plan.batches)
    names = [s.name for s in plan.stages]
    t0 = time.time() - 3 * 86400
    total = 0
    done: set[tuple[int, int]] = set()
    for number, (share, status, failures) in enumerate(
        [(0.4, "running", 0), (0.8, "failed", 20), (1.0, "completed", 0)], start=1
    ):
        started = t0 + number * 86400
        attempt = attempt_id(dt.datetime.fromtimestamp(started, dt.UTC), None, 1)
        layout = plan.layout
        records = []
        clock = started
        failing = set(rng.sample(range(n), min(failures, n))) if failures else set()
        for batch in range(int(n * share)):
            for stage, name in enumerate(names):
                base = {"attempt": attempt, "stage": name, "stage_index": stage, "batch": batch}
                base.update(piece=0, file=f"sample-{batch % SAMPLE_FILES}.parquet", rows_out=1)
                if (stage, batch) in done:
                    records.append({**base, "status": "reused"})
                    continue
                if batch in failing and stage == 1:
                    records.append(
                        {
                            **base,
                            "status": "failed",
                            "started": clock,
                            "ended": clock + 2,
                            "error_kind": "HTTP 503",
                            "error": "HTTP 503: upstream unavailable",
                            "file": None,
                            "rows_out": None,
                        }
                    )
                    break
                llm = stage in (1, 2, 4)
                seconds = rng.uniform(0.5, 3.0) if llm else 0.01
                records.append(
                    {
                        **base,
                        "status": "computed",
                        "started": clock,
                        "ended": clock + seconds,
                        "seconds": seconds,
                        "rows_in": 1,
                        "prompt_tokens": rng.randint(50, 400) if llm else 0,
                        "completion_tokens": rng.randint(20, 300) if llm else 0,
                        "cost_usd": 0.0,
                        "row_errors": json.dumps({"finish_reason length": 1})
                        if llm and rng.random() < 0.01
                        else None,
                    }
                )
                done.add((stage, batch))
                clock += seconds / 8  # 8 in flight
        meta = {
            "attempt": attempt,
            "pipeline": plan.spec.name,
            "flow_run_id": None,
            "flow_run_name": f"bench {number}",
            "run_count": 1,
            "started": started,
            "ended": None if status == "running" else clock,
            "status": status,
            "stages": [{"name": s.name, "fingerprint": s.fingerprint} for s in plan.stages],
        }
        plan.store.write_json(layout.attempt_file(attempt), meta)
        frame = records_frame(records)
        if status == "running":  # killed: chunks of ~30 s each, never compacted
            chunk = max(frame.height // 40, 1)
            for i, offset in enumerate(range(0, frame.height, chunk), start=1):
                frame.slice(offset, chunk).write_parquet(layout.unit_records(attempt, i))
        else:
            frame.write_parquet(layout.unit_records(attempt))
        total += frame.height
    return total


def measure(batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = make_plan(root, batches)
        write_outputs(plan)
        records = write_records(plan)
        began = time.perf_counter()
        loaded = load_records(plan)
        load_s = time.perf_counter() - began
        began = time.perf_counter()
        report = build_report(plan, loaded)
        build_s = time.perf_counter() - began
        began = time.perf_counter()
        write_report(plan, root / "report.html")
        whole_s = time.perf_counter() - began
        size = (root / "report.html").stat().st_size
    return {
        "batches": batches,
        "records": records,
        "charts": len(report.charts),
        "load_s": load_s,
        "build_s": build_s,
        "whole_s": whole_s,
        "mb": size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[100, 10_000])
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    began = time.perf_counter()
    vega_bundle()
    bundle_s = time.perf_counter() - began
    rows = [measure(n) for n in args.batches]
    base = rows[0]["whole_s"]
    table = Table(
        "batches",
        "unit records (3 attempts)",
        "charts",
        "read records s",
        "build HTML s",
        "write_report s",
        f"ratio to {rows[0]['batches']} batches",
        "HTML MB",
        title=f"run report build (5 steps; JS bundle made once per process: {bundle_s:.2f} s)",
    )
    for r in rows:
        table.add_row(
            f"{r['batches']:,}",
            f"{r['records']:,}",
            str(r["charts"]),
            f"{r['load_s']:.2f}",
            f"{r['build_s']:.2f}",
            f"{r['whole_s']:.2f}",
            f"{r['whole_s'] / base:.2f}x",
            f"{r['mb']:.2f}",
        )
    Console().print(table)
    if args.results:
        lines = [
            f"\n## Run report build ({dt.date.today()}, {platform.node()}, "
            f"{os.cpu_count()} cores, shared)\n",
            "`python benchmarks/bench_report.py`: a 5-step pipeline's report from three "
            "attempts' records (one killed, its records in chunks; one failed; one resumed), "
            f"data charts from 8 sampled outputs per step. The JS bundle (vl-convert) is "
            f"made once per process: {bundle_s:.2f} s.\n",
            "| batches | unit records | charts | read records s | build HTML s | "
            "write_report s | ratio | HTML MB |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['batches']:,} | {r['records']:,} | {r['charts']} | {r['load_s']:.2f} | "
                f"{r['build_s']:.2f} | {r['whole_s']:.2f} | {r['whole_s'] / base:.2f}x | "
                f"{r['mb']:.2f} |"
                for r in rows
            ),
        ]
        with open(args.results, "a") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
