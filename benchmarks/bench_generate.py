"""Generation throughput: the pipeline's ``generate`` step vs a bare ``vllm.LLM.generate``.

The same prompts, the same sampling (greedy), the same engine, in one run:

* **bare**: one ``llm.generate(prompts, params)`` call on the ``vllm.LLM`` object, the
  prompts already chat-templated and tokenized; nothing else;
* **pipeline**: a Prefect flow (``run_pipeline``) over a JSONL source of the same prompts,
  cut into batches, one ``generate`` task per batch on the ``ServingTaskRunner`` (threads
  feeding the one engine), each batch written to the step store as Parquet.

The pipeline runs inside ``shared_serving`` so both use the very same engine (started
once, before the clock); the Prefect API (the test harness's server) is started and warmed
up with a small run first. Tokens/s = completion tokens / wall seconds; the ratio is
pipeline / bare (target >= 0.9 on CPU, >= 0.95 on GPU). Outputs are compared row by row.

With ``--gpu`` (a CUDA machine) the model defaults to ``NIGHTSHIFT_GPU_MODEL`` or the
embedded SmolLM2, and when the machine has several GPUs the same comparison runs again on
one engine split over them with tensor parallelism (the largest GPU count the model's
attention and KV head counts divide by: SmolLM2's 9/3 heads split over 3). ``--results
FILE`` appends the tables to FILE (``make gpu-check`` appends to benchmarks/RESULTS.md).

    python benchmarks/bench_generate.py                     # CPU: embedded SmolLM2-135M
    python benchmarks/bench_generate.py --prompts 32 --max-tokens 32 --repeats 1   # quick
    python benchmarks/bench_generate.py --gpu               # CUDA: SmolLM2, TP if >= 2 GPUs
    python benchmarks/bench_generate.py --gpu --model Qwen/Qwen2.5-1.5B-Instruct
"""

from __future__ import annotations

import argparse
import datetime as dt
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

SUBJECTS = [
    "rivers",
    "bread",
    "the moon",
    "bicycles",
    "volcanoes",
    "libraries",
    "tea",
    "owls",
    "glaciers",
    "trains",
    "coral reefs",
    "chess",
    "honey",
    "lighthouses",
    "deserts",
    "violins",
]
ASKS = [
    "Write a short paragraph about {s}.",
    "Explain to a child what {s} are.",
    "List some facts about {s}.",
    "Tell a short story involving {s}.",
]

CPU = dict(prompts=64, max_tokens=64, batch_size=16, workers=4, max_model_len=1024, target=0.9)
GPU = dict(prompts=2048, max_tokens=256, batch_size=256, workers=8, max_model_len=2048, target=0.95)


def prompts(n: int) -> list[str]:
    return [
        ASKS[i % len(ASKS)].format(s=SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)])
        + ("" if i < len(ASKS) * len(SUBJECTS) else f" (variant {i})")
        for i in range(n)
    ]


def bare(backend: Any, texts: list[str], max_tokens: int) -> tuple[float, list[str], int]:
    """One ``llm.generate`` call on the engine's own thread (the CPU engine must be
    driven from the thread that created it)."""
    import vllm

    def run(llm: Any) -> tuple[float, list[Any]]:
        tok = llm.get_tokenizer()
        inputs = [
            {
                "prompt_token_ids": tok.encode(
                    tok.apply_chat_template(
                        [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                    ),
                    add_special_tokens=False,
                )
            }
            for t in texts
        ]
        params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - started, outputs

    seconds, outputs = backend.run_on_engine(run)
    return (
        seconds,
        [o.outputs[0].text for o in outputs],
        sum(len(o.outputs[0].token_ids) for o in outputs),
    )


def pipeline(
    work: Path,
    name: str,
    serving: dict,
    texts: list[str],
    max_tokens: int,
    batch_size: int,
    workers: int,
) -> tuple[float, list[str], int, dict]:
    import polars as pl

    from nightshift.flows.outputs import read_output
    from nightshift.flows.plan import build_plan
    from nightshift.flows.run_pipeline import run_pipeline

    src = work / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"i": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    spec = {
        "name": name,
        "source": {"path": str(src)},
        "batch_size": batch_size,
        "store": {"url": f"file://{work}/store-{name}"},
        "workers": workers,
        "max_in_flight": 2 * workers,
        "serving": serving,
        "steps": [
            {
                "generate": {
                    "input": "prompt",
                    "output": "reply",
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
            }
        ],
    }
    started = time.perf_counter()
    summary = run_pipeline(spec=spec)
    seconds = time.perf_counter() - started
    out = read_output(build_plan(spec)).sort("i")
    assert out.height == len(texts) and out["reply_error"].null_count() == len(texts)
    return (
        seconds,
        out["reply"].to_list(),
        int(out["reply_completion_tokens"].sum()),
        {
            "batches": summary["batches"],
            "rows": out.height,
            "tokens_recorded": summary["steps"][0]["completion_tokens"],
            "pl": pl.__version__,
        },
    )


def tensor_parallel_size(model_path: str, gpus: int) -> int:
    """The most GPUs (2..gpus) both head counts of the model divide by; 1 if none."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
    else:  # a hub id
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path).to_dict()
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return max([n for n in range(2, gpus + 1) if heads % n == 0 and kv_heads % n == 0], default=1)


def measure(
    work: Path, label: str, serving: dict, texts: list[str], opts: dict, repeats: int
) -> dict[str, Any]:
    """Start the engine of ``serving`` (timed), warm up, then ``repeats`` rounds of bare
    and pipeline; the best run of each, their ratio and the identical-reply count."""
    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.serving.runner import shared_serving

    rows: list[tuple[str, float, list[str], int]] = []
    info: dict[str, Any] = {"label": label}
    slug = f"tp{serving['default'].get('tensor_parallel_size', 1)}"  # pipeline names
    with shared_serving({k: ServingConfig(**v) for k, v in serving.items()}) as pool:
        started = time.perf_counter()
        backend = pool.served("default").backends[0].backend
        info["engine_start_s"] = time.perf_counter() - started
        info["identity"] = backend.identity()
        # warm-up: the engine's first steps, the first flow run (API, migrations)
        bare(backend, texts[:4], 8)
        pipeline(work, f"{slug}-warmup", serving, texts[:4], 8, 2, 2)
        for r in range(repeats):
            rows.append(("bare vllm.LLM.generate", *bare(backend, texts, opts["max_tokens"])))
            seconds, replies, tokens, info["pipeline"] = pipeline(
                work,
                f"{slug}-run{r}",
                serving,
                texts,
                opts["max_tokens"],
                opts["batch_size"],
                opts["workers"],
            )
            rows.append(("pipeline generate step", seconds, replies, tokens))
    best: dict[str, tuple[float, list[str], int]] = {}
    for name, seconds, replies, tokens in rows:
        if name not in best or seconds < best[name][0]:
            best[name] = (seconds, replies, tokens)
    (b_s, b_text, b_tok), (p_s, p_text, p_tok) = (
        best["bare vllm.LLM.generate"],
        best["pipeline generate step"],
    )
    info.update(
        rows=rows,
        best=best,
        ratio=(p_tok / p_s) / (b_tok / b_s),
        same=sum(a == b for a, b in zip(b_text, p_text, strict=True)),
        median=statistics.median(
            (pt / ps) / (bt / bs)
            for (_, bs, _, bt), (_, ps, _, pt) in zip(rows[0::2], rows[1::2], strict=True)
        ),
    )
    return info


def report(console: Any, info: dict[str, Any], opts: dict, repeats: int, n: int) -> list[str]:
    """Print one engine's table and ratio; the same as Markdown lines for --results."""
    from rich.table import Table

    ident = info["identity"]
    console.print(
        f"[bold]{info['label']}[/bold]: tensor_parallel_size "
        f"{ident['tensor_parallel_size']}, engine start {info['engine_start_s']:.1f}s; "
        f"pipeline: {info['pipeline']['batches']} batches of {opts['batch_size']}, "
        f"{opts['workers']} workers; best of {repeats}"
    )
    table = Table("path", "completion tokens", "seconds", "tokens/s", "runs (s)")
    lines = [
        "| path | completion tokens | seconds | tokens/s | runs (s) |",
        "|---|---|---|---|---|",
    ]
    for name, (seconds, _, tokens) in info["best"].items():
        runs = ", ".join(f"{s:.2f}" for r, s, _, _ in info["rows"] if r == name)
        cells = (name, f"{tokens:,}", f"{seconds:.2f}", f"{tokens / seconds:,.1f}", runs)
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    verdict = (
        f"ratio pipeline/bare tokens/s: {info['ratio']:.3f} (best runs; median of paired runs "
        f"{info['median']:.3f}); target >= {opts['target']}: "
        f"{'met' if info['ratio'] >= opts['target'] else 'NOT met'}; identical replies: "
        f"{info['same']}/{n}; tokens recorded by the run: {info['pipeline']['tokens_recorded']:,}"
    )
    console.print(verdict)
    return [
        f"{info['label']}: tensor_parallel_size {ident['tensor_parallel_size']}, engine start "
        f"{info['engine_start_s']:.1f} s, {info['pipeline']['batches']} batches of "
        f"{opts['batch_size']}, {opts['workers']} workers, best of {repeats}",
        "",
        *lines,
        "",
        verdict,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="CUDA machine: bigger defaults, tensor parallel too when >= 2 GPUs",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF folder or hub id (default: smollm2; with --gpu NIGHTSHIFT_GPU_MODEL if set)",
    )
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--batch-size", type=int, help="pipeline batch size (rows per task)")
    parser.add_argument("--workers", type=int, help="pipeline task threads")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; best is kept")
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=None,
        help="--gpu: GPUs for the tensor-parallel run (default: the most the model "
        "allows on this machine; 1: none)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="append the results, as Markdown, to this file"
    )
    args = parser.parse_args()
    mode = GPU if args.gpu else CPU
    opts = {
        k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in mode.items()
    }
    model = args.model or (args.gpu and os.environ.get("NIGHTSHIFT_GPU_MODEL")) or "smollm2"

    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device here (use the CPU mode)")
    if not args.gpu:
        torch.set_num_threads(1)  # vllm-on-cpu.md: vLLM keeps a core for itself
    from prefect.testing.utilities import prefect_test_harness
    from rich.console import Console

    from nightshift.core.embedded_model import resolve_model

    gpus = torch.cuda.device_count() if args.gpu else 0
    tp = 1
    if gpus >= 2:
        tp = args.tensor_parallel or tensor_parallel_size(resolve_model(model), gpus)
        if tp > 1:
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    engine = {
        "model": model,
        "max_model_len": opts["max_model_len"],
        "max_batch": 4096,
        "max_num_seqs": 256,
    }
    runs = [("one engine", {"default": engine})]
    if tp > 1:
        runs.append(
            (f"tensor parallel over {tp} GPUs", {"default": {**engine, "tensor_parallel_size": tp}})
        )
    texts = prompts(opts["prompts"])
    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-gen-"))
    results: list[dict[str, Any]] = []
    try:
        with prefect_test_harness(server_startup_timeout=180):
            for label, serving in runs:
                results.append(measure(work, label, serving, texts, opts, args.repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    console = Console(width=120)
    ident = results[0]["identity"]
    device = f"{gpus} x CUDA {torch.cuda.get_device_name(0)}" if args.gpu else "no GPU"
    machine = (
        f"{dt.date.today()} machine: {platform.machine()}, {os.cpu_count()} cores, {device}; "
        f"python {platform.python_version()}, torch {torch.__version__}, vllm "
        f"{ident['vllm_version']}; model {model} ({ident['dtype']})"
    )
    setup = f"{opts['prompts']} prompts, max_tokens {opts['max_tokens']}, greedy"
    console.print(machine)
    console.print(setup)
    markdown = [
        f"## Generation{' on GPU' if args.gpu else ''}: pipeline generate step vs bare "
        f"`vllm.LLM.generate` (`benchmarks/bench_generate.py{' --gpu' if args.gpu else ''}`), "
        f"{dt.date.today()}",
        "",
        machine,
        "",
        setup,
        "",
    ]
    for info in results:
        markdown += report(console, info, opts, args.repeats, len(texts))
    if gpus >= 2 and tp == 1 and args.tensor_parallel is None:
        line = f"tensor parallel: not run ({model}'s head counts do not split over {gpus} GPUs)"
        console.print(line)
        markdown += [line, ""]
    if args.results is not None:
        with args.results.open("a") as handle:
            handle.write("\n" + "\n".join(markdown))
        console.print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
