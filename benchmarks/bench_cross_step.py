"""Across steps: a ``generate -> judge`` pipeline on one vLLM engine vs a two-phase script.

The same rows, the same sampling (greedy), the very same engine, in one run:

* **two-phase script**: what a user writes by hand: one ``llm.generate`` over every
  generation prompt, then the judge prompts built from the replies, then one
  ``llm.generate`` over those (prompts chat-templated and tokenized as the pipeline's
  engine does it);
* **pipeline**: ``run_pipeline`` with a ``generate`` step and a ``judge`` step over
  batches of ``--batch-size`` rows, ``--workers`` task threads feeding the one engine.
  A batch moves to the judge as soon as its generation is done, so the engine runs
  judge requests of early batches beside the generation of later ones: when the
  generation's last, longest replies leave most of the engine's batch empty, judge
  requests fill it. The two-phase script has nothing to fill that tail with.

The replies vary in length on purpose (some asks want a word, others a paragraph), as
real generations do: that tail is where the two differ. The ratio is two-phase seconds /
pipeline seconds (> 1: the pipeline is faster; goal >= 1.1). Replies and scores are
compared row by row.

    python benchmarks/bench_cross_step.py                       # CPU: embedded SmolLM2
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


def rows(n: int) -> list[str]:
    return [
        ASKS[i % len(ASKS)].format(s=SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)]) + f" (#{i})"
        for i in range(n)
    ]


def operators(max_tokens: int, judge_tokens: int) -> list[dict[str, Any]]:
    return [
        {"generate": {"input": "prompt", "output": "reply", "max_tokens": max_tokens}},
        {
            "judge": {
                "input": "reply",
                "rubric": RUBRIC,
                "output": "score",
                "max_tokens": judge_tokens,
                "max_error_rate": 1.0,  # the small model's scores are not the point here
            }
        },
    ]


def two_phase(
    backend: Any, texts: list[str], max_tokens: int, judge_tokens: int
) -> tuple[float, list[str], list[str]]:
    """Generate all, then judge all: two ``llm.generate`` calls on the engine's thread.
    The judge's user message is rendered by the judge operator's own template."""
    import polars as pl
    import vllm

    from nightshift.tasks.operators.judge import Judge

    judge = Judge(input="reply", rubric=RUBRIC, output="score", max_tokens=judge_tokens)

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
        asks = judge._prompt_op().process(pl.DataFrame({"reply": replies}))["__prompt__"]
        second = llm.generate(
            encode(asks.to_list()),
            vllm.SamplingParams(max_tokens=judge_tokens, temperature=0.0, seed=0),
            use_tqdm=False,
        )
        return time.perf_counter() - started, replies, [o.outputs[0].text for o in second]

    return backend.run_on_engine(run)


def pipeline(
    work: Path, name: str, serving: dict, texts: list[str], opts: dict[str, int]
) -> tuple[float, list[str], list[str]]:
    from nightshift.flows.outputs import read_output
    from nightshift.flows.plan import build_plan
    from nightshift.flows.run_pipeline import run_pipeline

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
        "steps": operators(opts["max_tokens"], opts["judge_tokens"]),
    }
    started = time.perf_counter()
    run_pipeline(spec=spec)
    seconds = time.perf_counter() - started
    out = read_output(build_plan(spec)).sort("i")
    assert out.height == len(texts) and out["reply_error"].null_count() == len(texts)
    return seconds, out["reply"].to_list(), out["score_raw"].to_list()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--judge-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="rounds, order alternating")
    args = parser.parse_args()
    opts = {
        "max_tokens": args.max_tokens,
        "judge_tokens": args.judge_tokens,
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
    runs: dict[str, list[float]] = {"two-phase script": [], "pipeline": []}
    same = (0, 0)
    load = [os.getloadavg()[0]]
    try:
        with (
            prefect_test_harness(server_startup_timeout=180),
            shared_serving({k: ServingConfig(**v) for k, v in serving.items()}) as pool,
        ):
            backend = pool.served("default").backends[0].backend
            two_phase(backend, texts[:4], 8, 4)  # warm-up: the engine's first steps
            pipeline(work, "warmup", serving, texts[:4], {**opts, "max_tokens": 8})
            for r in range(args.repeats):
                order = ("script", "pipeline") if r % 2 == 0 else ("pipeline", "script")
                for side in order:
                    if side == "script":
                        s, replies_s, scores_s = two_phase(
                            backend, texts, args.max_tokens, args.judge_tokens
                        )
                        runs["two-phase script"].append(s)
                    else:
                        s, replies_p, scores_p = pipeline(work, f"run{r}", serving, texts, opts)
                        runs["pipeline"].append(s)
                    load.append(os.getloadavg()[0])
            same = (
                sum(a == b for a, b in zip(replies_s, replies_p, strict=True)),
                sum(a == b for a, b in zip(scores_s, scores_p, strict=True)),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    console = Console(width=120)
    table = Table(
        f"{args.rows} rows: generate (max_tokens {args.max_tokens}) -> judge "
        f"(max_tokens {args.judge_tokens}), greedy",
        "best s",
        "median s",
        "rounds (s)",
        "vs two-phase",
    )
    base = min(runs["two-phase script"])
    for name, seconds in runs.items():
        table.add_row(
            name,
            f"{min(seconds):.2f}",
            f"{statistics.median(seconds):.2f}",
            " ".join(f"{s:.2f}" for s in seconds),
            f"{base / min(seconds):.2f}x",
        )
    console.print(table)
    paired = [a / b for a, b in zip(runs["two-phase script"], runs["pipeline"], strict=True)]
    console.print(
        f"speed-up, pipeline over two-phase: best {base / min(runs['pipeline']):.2f}x, paired "
        f"rounds {' '.join(f'{p:.2f}x' for p in paired)} (goal >= 1.1x); identical replies "
        f"{same[0]}/{args.rows}, identical judge replies {same[1]}/{args.rows}; pipeline: "
        f"batches of {args.batch_size}, {args.workers} workers"
    )
    console.print(
        f"{platform.machine()}, {os.cpu_count()} cores, load {min(load):.1f}-{max(load):.1f}, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
