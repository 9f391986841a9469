"""``near_dedup``: quality on planted near-duplicates, the candidate libraries, and speed.

1. **Quality**: a labelled set of short texts (2-3 sentences) where some originals have 1-3
   planted variants (whitespace, casing, punctuation, character typos, a word edited,
   sentences reordered, or two of these) and a tenth of the originals are hard negatives
   that share a sentence with another original. A row should be dropped iff an earlier
   row (source order) belongs to its cluster: precision and recall of the drops, at the
   default settings and over a threshold sweep.
2. **Candidates**: the same texts through datasketch (``MinHash`` + ``MinHashLSH``, query
   then insert), rensa used the way its README shows (Python shingle sets,
   ``RMinHash`` objects, ``RMinHashLSH`` query then insert) and the operator's method
   (polars shingles and hashes, rensa sketches, banded candidates verified on the
   sketches): time on ``--candidate-rows`` texts, precision and recall on the labelled set.
   datasketch is not a dependency: point ``--datasketch-path`` at a folder where it is
   installed (``pip install --target DIR datasketch==2.0.0 scipy``), else it is skipped.
3. **Speed**: ``--rows`` (1M) short texts, 20% planted variants: the plain script (rensa
   as its README shows: read, dedup, write) vs ``near_dedup`` through the engine
   (``select`` then ``near_dedup``, a real Prefect API, the step store), and the operator's
   method without the engine (what the engine itself costs).

    python benchmarks/bench_near_dedup.py                   # all, 1M rows
    python benchmarks/bench_near_dedup.py --rows 100000     # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

from nightshift.tasks.operators.near_dedup import NearDedup, near_duplicate_parents

DEFAULT = NearDedup(column="text")
KINDS = ["whitespace", "casing", "punct", "typo", "word_edit", "reorder", "combo"]
_SENT = re.compile(r"[^.?!]+[.?!]")


# -- data ------------------------------------------------------------------------------
def vocabulary(rng: random.Random, n: int = 6000) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "ha",
                 "je", "po", "qui", "ri", "su", "te", "wa", "xo", "yi", "ze", "an", "el", "or",
                 "um", "ist", "ent", "ion"]  # fmt: skip
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    out = sorted(words)
    rng.shuffle(out)
    return out


def sentence(rng: random.Random, words: list[str], weights: list[float]) -> str:
    picked = rng.choices(words, weights, k=rng.randint(6, 12))
    return " ".join([picked[0].capitalize(), *picked[1:]]) + rng.choice(".....?!")


def typo(rng: random.Random, text: str, n: int) -> str:
    chars = list(text)
    for _ in range(n):
        i, c = rng.randrange(len(chars)), rng.choice("abcdefghijklmnopqrstuvwxyz")
        op = rng.randrange(3)
        if op == 0:
            chars[i] = c
        elif op == 1:
            del chars[i]
        else:
            chars.insert(i, c)
    return "".join(chars)


def variant(rng: random.Random, text: str, kind: str) -> str:
    """``text`` edited one way (a planted near-duplicate)."""
    if kind == "whitespace":
        spaces = [" ", "  ", " \n", "\t", " "]
        return re.sub(" ", lambda _: rng.choice(spaces), text) + rng.choice(["", " ", "\n"])
    if kind == "casing":
        mixed = " ".join(w.capitalize() if rng.random() < 0.5 else w for w in text.split(" "))
        return rng.choice([text.upper(), text.lower(), text.title(), mixed])
    if kind == "punct":
        return re.sub(r"[.?!]", lambda _: rng.choice([",", ";", "", "..."]), text)
    if kind == "typo":  # about one character edit per 60 characters
        return typo(rng, text, max(1, len(text) // 60))
    if kind == "word_edit":  # one word replaced, dropped or inserted
        ws = text.split(" ")
        i, op = rng.randrange(len(ws)), rng.randrange(3)
        if op == 0:
            ws[i] = "foo" + ws[i][::-1]
        elif op == 1 and len(ws) > 3:
            del ws[i]
        else:
            ws.insert(i, "indeed")
        return " ".join(ws)
    if kind == "reorder":
        sents = [s.strip() for s in _SENT.findall(text)]
        if len(sents) < 2:
            ws = text.split(" ")
            return " ".join(ws[len(ws) // 2 :] + ws[: len(ws) // 2])
        order = list(range(len(sents)))
        while order == sorted(order):
            rng.shuffle(order)
        return " ".join(sents[i] for i in order)
    if kind == "combo":  # two edits; a reorder first (it needs the sentence ends)
        pair = rng.sample(KINDS[:-1], 2)
        a, b = sorted(pair, key=lambda k: k != "reorder")
        return variant(rng, variant(rng, text, a), b)
    raise ValueError(kind)


def labelled(clusters: int = 3000, seed: int = 7) -> pl.DataFrame:
    """Rows ``text, cluster, kind`` in a shuffled source order."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    weights = [1 / (i + 1) ** 0.8 for i in range(len(words))]
    originals: list[str] = []
    for _ in range(clusters):
        sents = [sentence(rng, words, weights) for _ in range(rng.randint(2, 3))]
        if originals and rng.random() < 0.1:  # a hard negative: shares a sentence
            other = _SENT.findall(originals[rng.randrange(len(originals))])
            sents[0] = other[0].strip()
        originals.append(" ".join(sents))
    rows: list[tuple[str, int, str]] = []
    for c, text in enumerate(originals):
        rows.append((text, c, "original"))
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                kind = rng.choice(KINDS)
                rows.append((variant(rng, text, kind), c, kind))
    rng.shuffle(rows)
    df = pl.DataFrame(rows, schema=["text", "cluster", "kind"], orient="row")
    return df.with_columns(should_drop=pl.col("cluster").is_first_distinct().not_())


def bulk(rows: int, seed: int = 3) -> pl.DataFrame:
    """``rows`` short texts (2-3 sentences, ~175 characters); 20% are an earlier row
    edited (casing, whitespace, punctuation, a character, a word, halves swapped)."""
    rng = np.random.default_rng(seed)
    words = pl.Series(vocabulary(random.Random(seed)))
    per_text = rng.integers(2, 4, rows)
    sents = int(per_text.sum())
    lengths = rng.integers(6, 13, sents)
    p = 1 / np.arange(1, len(words) + 1) ** 0.8
    idx = rng.choice(len(words), int(lengths.sum()), p=p / p.sum())
    df = pl.DataFrame({"s": np.repeat(np.arange(sents), lengths), "w": words.gather(idx)})
    sent = df.group_by("s", maintain_order=True).agg(pl.col("w").str.join(" ") + ".")
    texts = (
        pl.DataFrame({"t": np.repeat(np.arange(rows), per_text), "w": sent["w"]})
        .group_by("t", maintain_order=True)
        .agg(pl.col("w").str.join(" "))
        .get_column("w")
    )
    dup = np.flatnonzero(rng.random(rows) < 0.2)
    dup = dup[dup > 0]
    src = (rng.random(len(dup)) * dup).astype(np.int64)  # an earlier row
    kind = rng.integers(0, 6, len(dup))
    pos = pl.Series((rng.random(len(dup)) * 150).astype(np.int64))
    base = texts.gather(src)
    edited = pl.select(
        pl.when(pl.lit(kind) == 0).then(base.str.to_uppercase())
        .when(pl.lit(kind) == 1).then(base.str.replace_all(" ", "  "))
        .when(pl.lit(kind) == 2).then(base.str.replace_all(".", "", literal=True))
        .when(pl.lit(kind) == 3).then(base.str.slice(0, pos) + "x" + base.str.slice(pos + 1))
        .when(pl.lit(kind) == 4).then(base.str.slice(0, pos) + " indeed " + base.str.slice(pos))
        .otherwise(base.str.slice(base.str.len_chars() // 2) + " " + base.str.slice(0, base.str.len_chars() // 2))
    ).to_series()  # fmt: skip
    texts = texts.scatter(dup, edited)
    return pl.DataFrame({"id": np.arange(rows), "text": texts})


# -- the ways to do it -------------------------------------------------------------------
def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def shingles(text: str, n: int) -> list[str]:
    t = normalise(text)
    return sorted({t[i : i + n] for i in range(max(1, len(t) - n + 1))})


def plain_rensa(
    texts: list[str], threshold: float, ngram: int, num_perm: int, seed: int
) -> np.ndarray:
    """rensa as its README shows: sketches from Python shingle sets, then query the LSH
    index with each row and insert the rows it does not match (keep-first)."""
    import rensa

    from nightshift.tasks.operators.near_dedup import rows_per_band

    sketches = rensa.RMinHash.from_token_sets([shingles(t, ngram) for t in texts], num_perm, seed)
    lsh = rensa.RMinHashLSH(threshold, num_perm, num_perm // rows_per_band(threshold, num_perm))
    drop = np.zeros(len(texts), dtype=bool)
    for i, sketch in enumerate(sketches):
        if any(sketch.jaccard(sketches[j]) >= threshold for j in lsh.query(sketch)):
            drop[i] = True
        else:
            lsh.insert(i, sketch)
    return drop


def plain_datasketch(
    texts: list[str], threshold: float, ngram: int, num_perm: int, seed: int
) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH  # type: ignore[import-not-found]

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    drop = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode() for s in shingles(text, ngram)])
        if lsh.query(m):
            drop[i] = True
        else:
            lsh.insert(str(i), m)
    return drop


def operator_method(
    texts: list[str], threshold: float, ngram: int, num_perm: int, seed: int
) -> np.ndarray:
    parents = near_duplicate_parents(
        pl.Series(texts, dtype=pl.String),
        threshold=threshold,
        ngram=ngram,
        num_perm=num_perm,
        seed=seed,
    )
    return parents >= 0


def score(drop: np.ndarray, should: np.ndarray) -> tuple[float, float]:
    tp = int((drop & should).sum())
    return tp / max(int(drop.sum()), 1), tp / max(int(should.sum()), 1)


def settings(threshold: float | None = None) -> dict[str, float | int]:
    return {
        "threshold": threshold or DEFAULT.threshold,
        "ngram": DEFAULT.ngram,
        "num_perm": DEFAULT.num_perm,
        "seed": DEFAULT.seed,
    }


# -- the engine ---------------------------------------------------------------------------
def pipeline_run(src: Path, store: Path, batch_size: int) -> tuple[float, dict]:
    from nightshift.flows.run_pipeline import run_pipeline

    spec = {
        "name": "bench-near-dedup",
        "source": {"path": str(src)},
        "batch_size": batch_size,
        "store": {"url": f"file://{store}"},
        "workers": 2,
        "max_in_flight": 4,
        "steps": [{"select": {"columns": ["id", "text"]}}, {"near_dedup": {"column": "text"}}],
    }
    started = time.perf_counter()
    summary = run_pipeline(spec=spec)
    return time.perf_counter() - started, summary


def plain_script(src: Path, out: Path) -> tuple[float, int]:
    """Read, dedup with rensa as its README shows, write the kept rows."""
    started = time.perf_counter()
    df = pl.read_parquet(src)
    drop = plain_rensa(df.get_column("text").to_list(), **settings())  # type: ignore[arg-type]
    df.filter(pl.Series(~drop)).write_parquet(out, compression="zstd", statistics=False)
    return time.perf_counter() - started, int((~drop).sum())


def method_script(src: Path, out: Path) -> tuple[float, int]:
    """The operator's method without the engine: read, dedup, write."""
    started = time.perf_counter()
    df = pl.read_parquet(src)
    drop = operator_method(df.get_column("text").to_list(), **settings())  # type: ignore[arg-type]
    df.filter(pl.Series(~drop)).write_parquet(out, compression="zstd", statistics=False)
    return time.perf_counter() - started, int((~drop).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--candidate-rows", type=int, default=20_000)
    parser.add_argument("--datasketch-path", default=os.environ.get("DATASKETCH_PATH"))
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.datasketch_path:
        sys.path.append(args.datasketch_path)  # after the venv: its numpy stays ours
    console = Console(width=130)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, polars {pl.__version__}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )

    data = labelled()
    texts, should = data.get_column("text").to_list(), data.get_column("should_drop").to_numpy()
    quality = Table(
        "threshold",
        "dropped",
        "precision",
        "recall",
        *KINDS,
        title=f"planted near-duplicates: {data.height:,} rows, "
        f"{int(should.sum()):,} to drop (recall per edit kind)",
    )
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.9):
        drop = operator_method(texts, **settings(threshold))  # type: ignore[arg-type]
        prec, rec = score(drop, should)
        kinds = data.get_column("kind").to_numpy()
        per = [f"{score(drop[kinds == k], should[kinds == k])[1]:.3f}" for k in KINDS]
        mark = " (default)" if threshold == DEFAULT.threshold else ""
        quality.add_row(
            f"{threshold}{mark}", f"{int(drop.sum()):,}", f"{prec:.4f}", f"{rec:.4f}", *per
        )
    console.print(quality)

    pool = bulk(args.candidate_rows, seed=5).get_column("text").to_list()
    candidates = Table(
        "implementation",
        f"s for {len(pool):,} texts",
        "texts/s",
        "precision",
        "recall",
        title="candidates at the default settings",
    )
    ways = [
        ("plain rensa 0.5.0 (objects, LSH loop)", plain_rensa),
        ("operator method (polars shingles + rensa)", operator_method),
    ]
    try:
        import datasketch  # type: ignore[import-not-found]  # noqa: F401

        ways.insert(0, ("datasketch 2.0.0", plain_datasketch))
    except ImportError:
        console.print("datasketch: not importable (see --datasketch-path), skipped")
    for label, way in ways:
        started = time.perf_counter()
        way(pool, **settings())
        took = time.perf_counter() - started
        prec, rec = score(way(texts, **settings()), should)
        candidates.add_row(
            label, f"{took:.2f}", f"{len(pool) / took:,.0f}", f"{prec:.4f}", f"{rec:.4f}"
        )
    console.print(candidates)
    if args.skip_speed:
        return

    from prefect.testing.utilities import prefect_test_harness

    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-nd-"))
    speed = Table(
        "run",
        "seconds",
        "rows kept",
        "vs plain script",
        title=f"{args.rows:,} short texts, batch_size {args.batch_size:,}",
    )
    try:
        src = work / "in.parquet"
        started = time.perf_counter()
        bulk(args.rows).write_parquet(src, compression="zstd", row_group_size=100_000)
        console.print(f"input written in {time.perf_counter() - started:.1f} s")
        with prefect_test_harness(server_startup_timeout=180):
            small = work / "warm.parquet"
            bulk(2000).write_parquet(small)
            pipeline_run(small, work / "store-warm", 500)  # the first flow pays migrations
            load = [os.getloadavg()[0]]
            plain, kept_plain = plain_script(src, work / "plain.parquet")
            load.append(os.getloadavg()[0])
            method, kept_method = method_script(src, work / "method.parquet")
            load.append(os.getloadavg()[0])
            pipe, summary = pipeline_run(src, work / "store", args.batch_size)
            load.append(os.getloadavg()[0])
        kept_pipe = summary["steps"][-1]["rows_out"]
        assert kept_pipe == kept_method, (kept_pipe, kept_method)
        speed.add_row(
            "plain script: rensa (objects, LSH loop)", f"{plain:.1f}", f"{kept_plain:,}", "1.00x"
        )
        speed.add_row(
            "operator method, no engine",
            f"{method:.1f}",
            f"{kept_method:,}",
            f"{method / plain:.2f}x",
        )
        speed.add_row(
            "near_dedup through the engine", f"{pipe:.1f}", f"{kept_pipe:,}", f"{pipe / plain:.2f}x"
        )
        console.print(speed)
        console.print(
            f"engine vs the same method without it: {pipe / method:.2f}x; 1-minute load "
            f"average before/after each run: {' '.join(f'{x:.1f}' for x in load)}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
