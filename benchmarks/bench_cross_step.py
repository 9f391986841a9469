"""Across steps: a ``generate -> judge`` pipeline on one vLLM engine vs a two-phase script.

The same rows, the same sampling (greedy), the very same engine, in one run:

* **two-phase script**: what a user writes by hand: one ``llm.generate`` over every
  generation prompt, then the judge prompts built from the replies, then one
  ``llm.generate`` over those (prompts chat-templated and tokenized as the pipeline's
  engine does it);
* **pipeline, batch-level hand-over** (``handover: false``): the ``run-pipeline`` flow,
  started as ``Pipeline.run`` and ``nightshift run`` start it (``run_spec``: an ad-hoc
  run, without Prefect's flow heartbeats, whose thread's join at the flow's end rounded
  every run up to the next whole second since its start), with a
  ``generate`` step and a ``judge`` step over batches of ``--batch-size`` rows,
  ``--workers`` task threads feeding the one engine. A batch moves to the judge as soon
  as its generation is done, so the engine runs judge requests of early batches beside
  the generation of later ones;
* **pipeline, row-level hand-over** (``handover: true``, the default): the same, and
  each row's judge request goes into the engine as soon as that row's reply is there,
  while the rest of its batch still generates (``ServingPool.prefetch``).

Workloads (``--workload``): ``judge`` (the judge operator: one score, ``--judge-tokens``
8) and ``rationale`` (a second ``generate`` that writes one sentence of rationale, then
a score: 48 tokens, so the second step has decode work of its own).

Every run starts with the engine's prefix cache emptied (the rounds repeat the same
prompts; blocks cached by an earlier run would make its prefills free). Within a run
vLLM's automatic prefix caching works as it does for any user: a prompt prefix computed
in an earlier engine step is reused by later requests, not by requests scheduled in the
same step (the two-phase script's second call schedules its 64 prompts together).

The replies vary in length on purpose (some asks want a word, others a paragraph), as
real generations do: that tail is where the two differ. The ratio is two-phase seconds /
pipeline seconds (> 1: the pipeline is faster; goal >= 1.1). Replies and scores are
compared row by row.

    python benchmarks/bench_cross_step.py                       # CPU: embedded SmolLM2
    python benchmarks/bench_cross_step.py --workload rationale              # 48-token second step
    python benchmarks/bench_cross_step.py --rows 32 --max-tokens 48 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBJECTS = ["rivers", "bread", "the moon", "bicycles", "volcanoes", "libraries", "tea", "owls"]
ASKS = [
    "Name {s} in one word.",
    "Write a long, detailed paragraph about {s}.",
    "Give a one-line definition of {s}.",
    "Tell a long story about {s}, with a beginning, a middle and an end.",
]
RUBRIC = "how informative the text is"
RATIONALE = (
    "In one sentence, say how informative the text below is, then give a score from 1 "
    "to 5 as 'Score: N'.\n\nText:\n{{ reply }}"
)


def rows(n: int) -> list[str]:
    return [
        ASKS[i % len(ASKS)].format(s=SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)]) + f" (#{i})"
        for i in range(n)
    ]


def second_step(workload: str, tokens: int) -> tuple[dict[str, Any], Any, str]:
    """The second step: its spec entry, its operator and the column compared."""
    from nightshift.tasks.operators.generate import Generate
    from nightshift.tasks.operators.judge import Judge

    if workload == "judge":
        config: dict[str, Any] = {
            "input": "reply",
            "rubric": RUBRIC,
            "output": "score",
            "max_tokens": tokens,
            "max_error_rate": 1.0,  # the small model's scores are not the point here
        }
        return {"judge": config}, Judge(**config), "score_raw"
    config = {"prompt": RATIONALE, "output": "verdict", "max_tokens": tokens}
    return {"generate": config}, Generate(**config), "verdict"


def operators(max_tokens: int, second: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"generate": {"input": "prompt", "output": "reply", "max_tokens": max_tokens}}, second]


def two_phase(
    backend: Any, texts: list[str], max_tokens: int, second: Any
) -> tuple[float, list[str], list[str]]:
    """Generate all, then the second step over all: two ``llm.generate`` calls on the
    engine's thread. The second step's user message is rendered by its own template."""
    import polars as pl
    import vllm

    def run(llm: Any) -> tuple[float, list[str], list[str]]:
        tok = llm.get_tokenizer()

        def encode(messages: list[str]) -> list[dict[str, list[int]]]:
            return [
                {
                    "prompt_token_ids": tok.encode(
                        tok.apply_chat_template(
                            [{"role": "user", "content": m}],
                            tokenize=False,
                            add_generation_prompt=True,
                        ),
                        add_special_tokens=False,
                    )
                }
                for m in messages
            ]

        started = time.perf_counter()
        first = llm.generate(
            encode(texts),
            vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0),
            use_tqdm=False,
        )
        replies = [o.outputs[0].text for o in first]
        asks = second._prompt_op().process(pl.DataFrame({"reply": replies}))["__prompt__"]
        then = llm.generate(
            encode(asks.to_list()),
            vllm.SamplingParams(max_tokens=second.max_tokens, temperature=0.0, seed=0),
            use_tqdm=False,
        )
        return time.perf_counter() - started, replies, [o.outputs[0].text for o in then]

    return backend.run_on_engine(run)


def pipeline(
    work: Path, name: str, serving: dict, texts: list[str], opts: dict[str, Any]
) -> tuple[float, list[str], list[str]]:
    from nightshift.flows.outputs import read_output
    from nightshift.flows.pipeline import run_spec
    from nightshift.flows.plan import build_plan
    from nightshift.tasks.spec import load_spec

    src = work / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"i": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    spec = {
        "name": name,
        "source": {"path": str(src)},
        "batch_size": opts["batch_size"],
        "store": {"url": f"file://{work}/store-{name}"},
        "workers": opts["workers"],
        "max_in_flight": 2 * opts["workers"],
        "handover": bool(opts.get("handover", True)),
        "serving": serving,
        "steps": operators(opts["max_tokens"], opts["second"]),
    }
    started = time.perf_counter()
    run_spec(load_spec(spec))  # as Pipeline.run and `nightshift run` start it
    seconds = time.perf_counter() - started
    out = read_output(build_plan(spec)).sort("i")
    assert out.height == len(texts) and out["reply_error"].null_count() == len(texts)
    return seconds, out["reply"].to_list(), out[opts["compare"]].to_list()


class EngineTimeline:
    """Every engine step's start, end, requests and scheduled tokens (the benchmark's
    view of where time goes: idle engine, prefill, decode batch sizes)."""

    def __init__(self, backend: Any) -> None:
        self.steps: list[tuple[float, float, int, int]] = []
        backend.run_on_engine(self._patch)

    def _patch(self, llm: Any) -> None:
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        schedule, step = scheduler.schedule, engine.step
        last: dict[str, int] = {}

        def timed_schedule(*args: Any, **kwargs: Any) -> Any:
            out = schedule(*args, **kwargs)
            last["n"], last["tokens"] = (
                len(out.num_scheduled_tokens),
                out.total_num_scheduled_tokens,
            )
            return out

        def timed_step() -> Any:
            started = time.perf_counter()
            last.clear()
            out = step()
            if last:
                self.steps.append((started, time.perf_counter(), last["n"], last["tokens"]))
            return out

        scheduler.schedule, engine.step = timed_schedule, timed_step

    def summary(self, started: float, ended: float) -> dict[str, float]:
        steps = [s for s in self.steps if started <= s[0] <= ended]
        busy = sum(b - a for a, b, _, _ in steps)
        decode = [s for s in steps if s[3] == s[2]]
        return {
            "busy": busy,
            "idle": (ended - started) - busy,
            "steps": len(steps),
            "tokens": sum(s[3] for s in steps),
            "prefill": sum(s[3] - s[2] for s in steps if s[3] > s[2]),
            "decode_batch": sum(s[2] for s in decode) / max(len(decode), 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--workload", choices=["judge", "rationale"], default="judge")
    parser.add_argument(
        "--judge-tokens", type=int, default=None, help="the second step's max_tokens (8 / 48)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="rounds, order alternating")
    args = parser.parse_args()
    if args.judge_tokens is None:
        args.judge_tokens = 8 if args.workload == "judge" else 48
    entry, second, compare = second_step(args.workload, args.judge_tokens)
    opts: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "second": entry,
        "compare": compare,
        "batch_size": args.batch_size,
        "workers": args.workers,
    }

    import torch

    torch.set_num_threads(1)  # vllm-on-cpu.md: vLLM keeps a core for itself
    from prefect.testing.utilities import prefect_test_harness
    from rich.console import Console
    from rich.table import Table

    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.serving.runner import shared_serving

    serving = {
        "default": {
            "model": "smollm2",
            "max_model_len": 1024,
            "max_batch": 4096,
            "max_num_seqs": 256,
        }
    }
    texts = rows(args.rows)
    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-cross-"))
    sides = {
        "two-phase script": None,
        "pipeline, batch hand-over": False,
        "pipeline, row hand-over": True,
    }
    runs: dict[str, list[float]] = {name: [] for name in sides}
    engine: dict[str, dict[str, float]] = {}
    answers: dict[str, tuple[list[str], list[str]]] = {}
    load = [os.getloadavg()[0]]
    handed = {"prefetched": 0, "taken": 0}
    try:
        with (
            prefect_test_harness(server_startup_timeout=180),
            shared_serving({k: ServingConfig(**v) for k, v in serving.items()}) as pool,
        ):
            backend = pool.served("default").backends[0].backend
            timeline = EngineTimeline(backend)
            warm = {**opts, "max_tokens": 8}
            two_phase(backend, texts[:4], 8, second)  # warm-up: the engine's first steps
            pipeline(work, "warmup", serving, texts[:4], warm)
            for r in range(args.repeats):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for side in order:
                    # every run starts with an empty prefix cache: the rounds ask the same
                    # prompts, and blocks cached by the run before would be free prefills
                    assert backend.run_on_engine(lambda llm: llm.reset_prefix_cache())
                    started = time.perf_counter()
                    if sides[side] is None:
                        s, *got = two_phase(backend, texts, args.max_tokens, second)
                    else:
                        name = f"run{r}-{'rows' if sides[side] else 'batches'}"
                        s, *got = pipeline(
                            work, name, serving, texts, {**opts, "handover": sides[side]}
                        )
                    runs[side].append(s)
                    engine[side] = timeline.summary(started, time.perf_counter())
                    answers[side] = (got[0], got[1])
                    load.append(os.getloadavg()[0])
            handed = pool.handover()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    script = answers["two-phase script"]
    same = {
        side: (
            sum(a == b for a, b in zip(script[0], got[0], strict=True)),
            sum(a == b for a, b in zip(script[1], got[1], strict=True)),
        )
        for side, got in answers.items()
        if side != "two-phase script"
    }

    console = Console(width=140)
    table = Table(
        "run",
        "best s",
        "median s",
        "rounds (s)",
        "vs two-phase",
        "paired",
        "engine busy/idle s",
        "prefill tok",
        "decode batch",
        "same replies",
        title=f"{args.rows} rows: generate (max_tokens {args.max_tokens}) -> {args.workload} "
        f"(max_tokens {args.judge_tokens}), greedy, one engine",
    )
    base = runs["two-phase script"]
    for name, seconds in runs.items():
        e = engine[name]
        paired = [b / s for b, s in zip(base, seconds, strict=True)]
        table.add_row(
            name,
            f"{min(seconds):.2f}",
            f"{statistics.median(seconds):.2f}",
            " ".join(f"{s:.2f}" for s in seconds),
            f"{min(base) / min(seconds):.2f}x",
            " ".join(f"{p:.2f}x" for p in paired),
            f"{e['busy']:.2f} / {e['idle']:.2f}",
            f"{e['prefill']}",
            f"{e['decode_batch']:.1f}",
            "-"
            if name not in same
            else f"{same[name][0]}/{args.rows}, {same[name][1]}/{args.rows}",
        )
    console.print(table)
    console.print(
        f"goal: pipeline >= 1.1x the two-phase script; engine columns: the last round; "
        f"row-level hand-over: {handed['prefetched']} requests prefetched, {handed['taken']} "
        f"taken (all rounds); batches of {args.batch_size}, {args.workers} workers"
    )
    console.print(
        f"{platform.machine()}, {os.cpu_count()} cores, load {min(load):.1f}-{max(load):.1f}, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
