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

    python benchmarks/bench_generate.py                     # CPU: embedded SmolLM2-135M
    python benchmarks/bench_generate.py --prompts 32 --max-tokens 32 --repeats 1   # quick
    python benchmarks/bench_generate.py --gpu --model Qwen/Qwen2.5-1.5B-Instruct   # CUDA
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

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

SUBJECTS = ["rivers", "bread", "the moon", "bicycles", "volcanoes", "libraries", "tea",
            "owls", "glaciers", "trains", "coral reefs", "chess", "honey", "lighthouses",
            "deserts", "violins"]
ASKS = ["Write a short paragraph about {s}.", "Explain to a child what {s} are.",
        "List some facts about {s}.", "Tell a short story involving {s}."]

CPU = dict(prompts=64, max_tokens=64, batch_size=16, workers=4, max_model_len=1024, target=0.9)
GPU = dict(prompts=2048, max_tokens=256, batch_size=256, workers=8, max_model_len=2048, target=0.95)


def prompts(n: int) -> list[str]:
    return [ASKS[i % len(ASKS)].format(s=SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)])
            + ("" if i < len(ASKS) * len(SUBJECTS) else f" (variant {i})") for i in range(n)]


def bare(backend: Any, texts: list[str], max_tokens: int) -> tuple[float, list[str], int]:
    """One ``llm.generate`` call on the engine's own thread (the CPU engine must be
    driven from the thread that created it)."""
    import vllm

    def run(llm: Any) -> tuple[float, list[Any]]:
        tok = llm.get_tokenizer()
        inputs = [
            {"prompt_token_ids": tok.encode(
                tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False)}
            for t in texts
        ]
        params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - started, outputs

    seconds, outputs = backend.run_on_engine(run)
    return seconds, [o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs)


def pipeline(work: Path, name: str, serving: dict, texts: list[str], max_tokens: int,
             batch_size: int, workers: int) -> tuple[float, list[str], int, dict]:
    import polars as pl

    from nightshift.flows.outputs import read_output
    from nightshift.flows.plan import build_plan
    from nightshift.flows.run_pipeline import run_pipeline

    src = work / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"i": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    spec = {
        "name": name, "source": {"path": str(src)}, "batch_size": batch_size,
        "store": {"url": f"file://{work}/store-{name}"}, "workers": workers,
        "max_in_flight": 2 * workers, "serving": serving,
        "steps": [{"generate": {"input": "prompt", "output": "reply", "max_tokens": max_tokens,
                                "temperature": 0}}],
    }
    started = time.perf_counter()
    summary = run_pipeline(spec=spec)
    seconds = time.perf_counter() - started
    out = read_output(build_plan(spec)).sort("i")
    assert out.height == len(texts) and out["reply_error"].null_count() == len(texts)
    return seconds, out["reply"].to_list(), int(out["reply_completion_tokens"].sum()), {
        "batches": summary["batches"], "rows": out.height,
        "tokens_recorded": summary["steps"][0]["completion_tokens"], "pl": pl.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA machine: bigger defaults and --model (a larger model)")
    parser.add_argument("--model", default=None,
                        help="HF folder or hub id (default: smollm2 on CPU; NIGHTSHIFT_GPU_MODEL with --gpu)")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--batch-size", type=int, help="pipeline batch size (rows per task)")
    parser.add_argument("--workers", type=int, help="pipeline task threads")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; best is kept")
    args = parser.parse_args()
    mode = GPU if args.gpu else CPU
    opts = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in mode.items()}
    model = args.model or (os.environ.get("NIGHTSHIFT_GPU_MODEL") if args.gpu else "smollm2")
    if not model:
        parser.error("--gpu needs --model (or NIGHTSHIFT_GPU_MODEL): a local folder or hub id")

    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device here (use the CPU mode)")
    if not args.gpu:
        torch.set_num_threads(1)  # vllm-on-cpu.md: vLLM keeps a core for itself
    from prefect.testing.utilities import prefect_test_harness

    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.serving.runner import shared_serving

    serving = {"default": {"model": model, "max_model_len": opts["max_model_len"],
                           "max_batch": 4096, "max_num_seqs": 256}}
    texts = prompts(opts["prompts"])
    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-gen-"))
    rows: list[tuple[str, float, int, list[str]]] = []
    info: dict[str, Any] = {}
    try:
        with prefect_test_harness(server_startup_timeout=180), \
                shared_serving({k: ServingConfig(**v) for k, v in serving.items()}) as pool:
            started = time.perf_counter()
            backend = pool.served("default").backends[0].backend
            info["engine_start_s"] = time.perf_counter() - started
            info["identity"] = backend.identity()
            # warm-up: the engine's first steps, the first flow run (API, migrations)
            bare(backend, texts[:4], 8)
            pipeline(work, "warmup", serving, texts[:4], 8, 2, 2)
            for r in range(args.repeats):
                rows.append(("bare vllm.LLM.generate", *bare(backend, texts, opts["max_tokens"])))
                seconds, replies, tokens, info["pipeline"] = pipeline(
                    work, f"run{r}", serving, texts, opts["max_tokens"], opts["batch_size"],
                    opts["workers"])
                rows.append(("pipeline generate step", seconds, replies, tokens))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best: dict[str, tuple[float, list[str], int]] = {}
    for name, seconds, replies, tokens in rows:
        if name not in best or seconds < best[name][0]:
            best[name] = (seconds, replies, tokens)
    (b_s, b_text, b_tok), (p_s, p_text, p_tok) = best["bare vllm.LLM.generate"], best["pipeline generate step"]
    same = sum(a == b for a, b in zip(b_text, p_text))
    console = Console(width=120)
    ident = info["identity"]
    console.print(
        f"{dt.date.today()} machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if args.gpu else 'no GPU'}; python "
        f"{platform.python_version()}, torch {torch.__version__}, vllm {ident['vllm_version']}; "
        f"model {model} ({ident['dtype']}); engine start {info['engine_start_s']:.1f}s"
    )
    console.print(
        f"{opts['prompts']} prompts, max_tokens {opts['max_tokens']}, greedy; pipeline: "
        f"{info['pipeline']['batches']} batches of {opts['batch_size']}, {opts['workers']} workers; "
        f"best of {args.repeats}"
    )
    table = Table("path", "completion tokens", "seconds", "tokens/s", "runs (s)")
    for name, (seconds, _, tokens) in best.items():
        runs = ", ".join(f"{s:.2f}" for n, s, _, _ in rows if n == name)
        table.add_row(name, f"{tokens:,}", f"{seconds:.2f}", f"{tokens / seconds:,.1f}", runs)
    console.print(table)
    ratio = (p_tok / p_s) / (b_tok / b_s)
    median = statistics.median(
        (pt / ps) / (bt / bs)
        for (_, bs, _, bt), (_, ps, _, pt) in zip(rows[0::2], rows[1::2])
    )
    console.print(
        f"ratio pipeline/bare tokens/s: {ratio:.3f} (best runs; median of paired runs "
        f"{median:.3f}); target >= {opts['target']}: {'met' if ratio >= opts['target'] else 'NOT met'}"
    )
    console.print(f"identical replies: {same}/{len(texts)}; tokens recorded by the run: "
                  f"{info['pipeline']['tokens_recorded']:,}")


if __name__ == "__main__":
    main()
