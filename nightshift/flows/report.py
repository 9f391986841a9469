"""The run report: one self-contained HTML file of charts and samples (docs/report.md).

``nightshift report SPEC --to report.html`` writes it, and every run saves one in its
attempt's folder of the store (``<pipeline>/runs/<attempt>/report.html``) and names it
in its summary artifact. It is built from what runs recorded as they went
(``flows/recording.py``: one record per unit) and from a sample of the outputs, never
from a pass over the data: a 10,000-batch run's report builds in seconds
(``benchmarks/bench_report.py``).

Charts are Vega-Lite specs (``flows/vegalite.py``: written as the JSON they are) drawn in
the browser by vega-embed; the JavaScript (vega, vega-lite, vega-embed) comes from the
``vl-convert-python`` package and is inlined, so the file opens offline. Each chart is a
``<div class="chart">``; the page sets ``data-rendered`` on each one drawn and
``data-charts="done"`` on its body when all are (what ``tests/test_report.py`` waits for
in headless Chromium).

A chart's data goes into its spec's ``datasets`` by name (``_ReportData.data``), once
however many of its layers use it.

Example::

    from nightshift.flows.plan import build_plan
    from nightshift.flows.report import build_report

    html = build_report(build_plan("examples/nightly.yaml")).html
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import html
import json
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl
from fsspec.implementations.local import LocalFileSystem

from nightshift.core import file_io
from nightshift.core.errors import one_line
from nightshift.flows import vegalite as vl
from nightshift.flows.plan import Plan
from nightshift.flows.recording import RunRecords, info, load_records, warn
from nightshift.tasks.operators import ROW_ID
from nightshift.tasks.operators.llm import SUFFIXES

#: Outputs read per stage for the length and score charts and the samples (spread over
#: the run's batches), and the values kept per column (also the most rows read of each
#: output: the charts keep that many, so a 500,000-row batch is not read for them).
SAMPLE_UNITS = 8
SAMPLE_VALUES = 5000
SAMPLE_ROWS = 5
#: Time bins per attempt in the throughput chart.
TIME_BINS = 60
#: Characters of a text cell shown in the samples.
CELL_CHARS = 300


@dataclass
class Report:
    """A built report: the page, its charts' ids, and what it was built from."""

    html: str
    charts: list[str]
    attempts: int
    units: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def save_report(plan: Plan, attempt: str) -> str | None:
    """Build the report and save it in ``attempt``'s folder of the store; its location
    for people (``StepStore.display``), or None (a warning says why) if it failed: a
    report never fails a run."""
    try:
        report = build_report(plan)
        path = plan.layout.report_file(attempt)
        file_io.write_bytes_atomic(plan.store.fs, path, report.html.encode())
        shown = plan.store.display(path)
        info(f"run report: {shown} (built in {report.seconds:.1f} s)")
        return shown
    except Exception as exc:
        warn(f"could not write the run report: {one_line(exc)}")
        return None


def write_report(plan: Plan, to: Path) -> Report:
    """Build the report and write it to the local file ``to``."""
    report = build_report(plan)
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_text(report.html, encoding="utf-8")
    return report


def build_report(plan: Plan, records: RunRecords | None = None) -> Report:
    """The report of the plan's pipeline: every recorded attempt that ran its steps."""
    began = time.perf_counter()
    records = records if records is not None else load_records(plan)
    data = _ReportData(plan, records)
    charts: list[tuple[str, str, vl.Spec | None, str]] = [
        ("graph", "Steps and rows (the funnel)", data.graph(), data.graph_note()),
        ("funnel", "Rows in and out per step", data.funnel(), ""),
        ("timeline", "When each step ran, per attempt", data.timeline(), ""),
        ("throughput", "Throughput over the run (rows out per second)", data.throughput(), ""),
        ("step-time", "Compute time per step", data.step_time(), ""),
        ("tokens", "LLM tokens per step", data.tokens(), ""),
        ("cost", "Estimated cost per step (USD)", data.cost(), ""),
        ("errors", "Errors by kind and step", data.errors(), ""),
        ("lengths", "Lengths of generated texts (characters)", data.lengths(), ""),
        ("scores", "Score distributions (judge and score steps)", data.scores(), ""),
    ]
    sections: list[str] = []
    ids: list[str] = []
    specs: list[str] = []
    for key, title, chart, note in charts:
        body = f"<p class=note>{html.escape(note)}</p>" if note else ""
        if chart is None:
            empty = data.empty_notes.get(key)
            if empty is None:
                continue
            body += f"<p class=empty>{html.escape(empty)}</p>"
        else:
            spec = vl.top(chart)
            spec["datasets"] = {n: data.datasets[n] for n in _data_names(spec)}
            ids.append(key)
            specs.append(
                f'<script type="application/json" id="spec-{key}">{_script_json(spec)}</script>'
            )
            body += f'<div class="chart" id="chart-{key}" data-spec="spec-{key}"></div>'
        sections.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>')
    page = _PAGE.format(
        title=html.escape(f"{plan.spec.name}: run report"),
        heading=html.escape(
            plan.spec.name + (f" ({plan.spec.partition})" if plan.spec.partition else "")
        ),
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        style=_STYLE,
        attempts=data.attempts_table(),
        sections="\n".join(sections),
        errors=data.error_table(),
        samples=data.samples(),
        specs="\n".join(specs),
        bundle=vega_bundle(),
        render=_RENDER,
    )
    return Report(
        page,
        ids,
        len(records.attempts),
        records.units.height,
        time.perf_counter() - began,
        data.notes,
    )


@functools.cache
def vega_bundle() -> str:
    """vega, vega-lite and vega-embed as one script (from ``vl-convert-python``), for the
    Vega-Lite version the specs are written for (``vegalite.VERSION``); ``</script``
    escaped so it can sit inline.

    Bundling takes a second or more, so the script is kept in the user's cache folder
    (``$XDG_CACHE_HOME/nightshift``, else ``~/.cache/nightshift``) under the versions it
    was made from; a cache that cannot be written is skipped."""
    wanted = ".".join(vl.VERSION.split(".")[:2])
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cached = Path(
        home,
        "nightshift",
        f"vega-{metadata.version('vl-convert-python')}-{wanted}.js",
    )
    with contextlib.suppress(OSError):
        return cached.read_text(encoding="utf-8")
    import vl_convert as vlc  # only to bundle (once per machine): its import is ~8 MB

    version = wanted if wanted in vlc.get_vegalite_versions() else None
    # the stub types snippet as str; None (its default) sets window.vegaEmbed, vega, vegaLite
    bundle = vlc.javascript_bundle(None, version)  # pyright: ignore[reportArgumentType]
    bundle = bundle.replace("</script", "<\\/script")
    with contextlib.suppress(OSError):
        file_io.write_bytes_atomic(LocalFileSystem(), str(cached), bundle.encode())
    return bundle


def _data_names(spec: Any) -> set[str]:
    """The named data a chart's spec refers to (``{"data": {"name": ...}}``, any depth)."""
    if isinstance(spec, dict):
        found = {spec["name"]} if set(spec) == {"name"} and isinstance(spec["name"], str) else set()
        for value in spec.values():
            found |= _data_names(value)
        return found
    if isinstance(spec, list):
        return set().union(*(_data_names(v) for v in spec)) if spec else set()
    return set()


def _script_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


#: a chart's colour per attempt (run) of the pipeline
ATTEMPT_COLOR = vl.nominal("run", title="attempt")


# -- the data behind the charts -------------------------------------------------------------
class _ReportData:
    def __init__(self, plan: Plan, records: RunRecords) -> None:
        self.plan = plan
        self.records = records
        self.notes: list[str] = []
        self.empty_notes: dict[str, str] = {}
        self.stage_names = [s.name for s in plan.stages]
        order = {str(a["attempt"]): i for i, a in enumerate(records.attempts)}
        self.attempt_label = {
            str(a["attempt"]): f"#{i + 1} {a.get('flow_run_name') or a['attempt']}"
            + (f" (try {a.get('run_count')})" if (a.get("run_count") or 1) > 1 else "")
            for i, a in enumerate(records.attempts)
        }
        # a unit record counts for a stage when the attempt ran that stage's current steps
        current = {s.name: s.fingerprint for s in plan.stages}
        same = [
            (str(a["attempt"]), s["name"])
            for a in records.attempts
            for s in a.get("stages", [])
            if current.get(s.get("name")) == s.get("fingerprint")
        ]
        units = records.units.join(
            pl.DataFrame(same, schema={"attempt": pl.String, "stage": pl.String}, orient="row"),
            on=["attempt", "stage"],
            how="semi",
        )
        self.units = units.with_columns(
            pl.col("attempt").replace_strict(order, default=-1).alias("order"),
            pl.col("attempt").replace_strict(self.attempt_label, default="?").alias("run"),
        )
        self.computed = self.units.filter(pl.col("status") == "computed")
        # each unit's latest outcome that has an output: what the store holds now
        self.latest = (
            self.units.filter(pl.col("status") != "failed", pl.col("batch") >= 0)
            .sort("order")
            .unique(["stage", "batch", "piece"], keep="last", maintain_order=True)
        )
        self.rows_out = {
            r["stage"]: r["rows_out"]
            for r in self.latest.group_by("stage")
            .agg(pl.col("rows_out").sum())
            .iter_rows(named=True)
        }
        self.batches_done = {
            r["stage"]: r["batch"]
            for r in self.latest.group_by("stage")
            .agg(pl.col("batch").n_unique())
            .iter_rows(named=True)
        }
        self._frames: dict[int, pl.DataFrame | None] = {}
        #: the charts' data by name: a chart names its data (``vl.named``) and the values
        #: go into its spec's top-level ``datasets``, once however many layers use them
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    def stage_axis(self) -> vl.Spec:
        """The steps down a chart's y axis, in the pipeline's order."""
        return vl.nominal("stage", sort=self.stage_names, title=None)

    def data(self, values: list[dict[str, Any]]) -> vl.Spec:
        name = f"d{len(self.datasets)}"
        self.datasets[name] = values
        return vl.named(name)

    # -- the pipeline ---------------------------------------------------------------------
    def _rows_in(self, stage: int) -> int:
        parents = self.plan.stages[stage].parents
        if not parents:
            return sum(b.rows for b in self.plan.batches)
        return min(self.rows_out.get(self.stage_names[p], 0) for p in parents)

    def _stage_rows(self) -> list[dict[str, Any]]:
        n = len(self.plan.batches)
        return [
            {
                "step": s.name,
                "order": s.index,
                "rows_in": self._rows_in(s.index),
                "rows_out": self.rows_out.get(s.name, 0),
                "done": f"{self.batches_done.get(s.name, 0)}/{n} batches",
            }
            for s in self.plan.stages
        ]

    def graph(self) -> vl.Spec:
        stages = self.plan.stages
        depth: dict[int, int] = {}
        for s in stages:  # stages are in topological order
            depth[s.index] = 1 + max((depth[p] for p in s.parents), default=-1)
        lanes: dict[int, int] = {}
        nodes = []
        for row, s in zip(self._stage_rows(), stages, strict=True):
            lane = lanes[depth[s.index]] = lanes.get(depth[s.index], -1) + 1
            kept = row["rows_out"] / row["rows_in"] if row["rows_in"] else 1.0
            nodes.append(
                {
                    **row,
                    "x": depth[s.index],
                    "y": lane,
                    "kept": round(100 * kept, 1),
                    "label": f"{row['rows_in']:,} in, {row['rows_out']:,} out",
                    "ops": " + ".join(op.name for op in s.operators),
                }
            )
        at = {s.index: (n["x"], n["y"]) for s, n in zip(stages, nodes, strict=True)}
        edges = [
            {"x": at[p][0], "y": at[p][1], "x2": at[s.index][0], "y2": at[s.index][1]}
            for s in stages
            for p in s.parents
        ]
        source = {"x": -1, "y": 0, "label": f"{sum(b.rows for b in self.plan.batches):,} rows"}
        edges += [
            {"x": -1, "y": 0, "x2": at[s.index][0], "y2": at[s.index][1]}
            for s in stages
            if not s.parents
        ]
        width = max(160 * (max(depth.values(), default=0) + 2), 320)
        height = max(90 * (max(lanes.values(), default=0) + 1), 120)
        xs = vl.quantitative("x", axis=None, scale={"domain": [-1.4, max(depth.values()) + 0.4]})
        ys = vl.quantitative("y", axis=None, scale={"domain": [-0.6, max(lanes.values()) + 0.6]})
        at_node = {"x": xs, "y": ys}
        node_data = self.data(nodes)
        source_data = self.data([source])
        tooltip = vl.tooltip(
            vl.nominal("step"),
            vl.nominal("ops"),
            vl.quantitative("rows_in"),
            vl.quantitative("rows_out"),
            vl.quantitative("kept"),
            vl.nominal("done"),
        )
        layers = [
            vl.chart(
                self.data(edges),
                vl.mark("rule", color="#999", strokeWidth=2),
                **at_node,
                x2={"field": "x2"},
                y2={"field": "y2"},
            ),
            vl.chart(
                source_data,
                vl.mark("point", shape="triangle-right", size=500, filled=True, color="#666"),
                **at_node,
            ),
            vl.chart(
                source_data,
                vl.mark("text", dy=26, fontSize=11),
                **at_node,
                text=vl.nominal("label"),
            ),
            vl.chart(
                node_data,
                vl.mark("square", size=900, opacity=1),
                **at_node,
                color=vl.quantitative(
                    "kept", title="% rows kept", scale={"scheme": "blues", "domain": [0, 100]}
                ),
                tooltip=tooltip,
            ),
            vl.chart(
                node_data,
                vl.mark("text", dy=-28, fontWeight="bold"),
                **at_node,
                text=vl.nominal("step"),
            ),
            vl.chart(
                node_data, vl.mark("text", dy=30, fontSize=11), **at_node, text=vl.nominal("label")
            ),
        ]
        return {"layer": layers, "width": width, "height": height}

    def graph_note(self) -> str:
        return "Each square is a step (a task stage); its colour is the share of its input rows it kept."

    def funnel(self) -> vl.Spec:
        rows = self._stage_rows()
        long = [
            {"step": r["step"], "which": which, "rows": r[key], "order": r["order"]}
            for r in rows
            for which, key in (("rows in", "rows_in"), ("rows out", "rows_out"))
        ]
        return {
            **vl.chart(
                self.data(long),
                "bar",
                y=vl.nominal("step", sort=self.stage_names, title=None),
                yOffset=vl.nominal("which"),
                x=vl.quantitative("rows", title="rows"),
                color=vl.nominal("which", title=None, scale={"range": ["#bbb", "#3b7dd8"]}),
                tooltip=vl.tooltip(
                    vl.nominal("step"), vl.nominal("which"), vl.quantitative("rows", format=",")
                ),
            ),
            "width": 560,
        }

    # -- time ---------------------------------------------------------------------------
    def _timed(self) -> pl.DataFrame:
        return self.computed.filter(pl.col("started").is_not_null(), pl.col("ended").is_not_null())

    def timeline(self) -> vl.Spec | None:
        timed = self.units.filter(
            pl.col("status").is_in(["computed", "failed"]), pl.col("started").is_not_null()
        )
        if timed.is_empty():
            self.empty_notes["timeline"] = (
                "No step computed anything in the recorded runs (all reused)."
            )
            return None
        spans = (
            timed.group_by(["run", "order", "stage", "stage_index"])
            .agg(
                (pl.col("started").min() * 1000).alias("start"),
                (pl.col("ended").max() * 1000).alias("end"),
                (pl.col("status") == "computed").sum().alias("computed"),
                (pl.col("status") == "failed").sum().alias("failed"),
                pl.col("rows_out").sum().alias("rows_out"),
                pl.col("seconds").sum().round(2).alias("compute_s"),
            )
            .sort(["order", "stage_index"])
        )
        return vl.rows_of(
            vl.chart(
                self.data(spans.drop("order").to_dicts()),
                vl.mark("bar", height={"band": 0.7}),
                x=vl.temporal("start", title="time (UTC)", scale={"type": "utc"}),
                x2={"field": "end"},
                y=self.stage_axis(),
                color=ATTEMPT_COLOR,
                tooltip=vl.tooltip(
                    vl.nominal("run"),
                    vl.nominal("stage"),
                    vl.quantitative("computed"),
                    vl.quantitative("failed"),
                    vl.quantitative("rows_out", format=","),
                    vl.quantitative("compute_s"),
                ),
            ),
            "run",
            width=640,
        )

    def throughput(self) -> vl.Spec | None:
        timed = self._timed().filter(pl.col("batch") >= 0)
        if timed.is_empty():
            self.empty_notes["throughput"] = "No step computed anything in the recorded runs."
            return None
        bounds = timed.group_by("run").agg(
            pl.col("started").min().alias("t0"), pl.col("ended").max().alias("t1")
        )
        binned = (
            timed.join(bounds, on="run")
            .with_columns(
                width=((pl.col("t1") - pl.col("t0")) / TIME_BINS).clip(lower_bound=1.0),
            )
            .with_columns(
                slot=((pl.col("ended") - pl.col("t0")) / pl.col("width")).floor(),
            )
            .group_by(["run", "stage", "slot", "t0", "width"])
            .agg(pl.col("rows_out").sum())
            .with_columns(
                time=((pl.col("t0") + (pl.col("slot") + 0.5) * pl.col("width")) * 1000),
                rows_per_s=(pl.col("rows_out") / pl.col("width")).round(2),
            )
            .sort(["run", "stage", "time"])
            .select(["run", "stage", "time", "rows_per_s", "rows_out"])
        )
        return vl.rows_of(
            vl.chart(
                self.data(binned.to_dicts()),
                vl.mark("line", point=True),
                x=vl.temporal("time", title="time (UTC)", scale={"type": "utc"}),
                y=vl.quantitative("rows_per_s", title="rows out / s"),
                color=vl.nominal("stage", sort=self.stage_names, title="step"),
                tooltip=vl.tooltip(
                    vl.nominal("run"),
                    vl.nominal("stage"),
                    vl.quantitative("rows_per_s"),
                    vl.quantitative("rows_out"),
                ),
            ),
            "run",
            width=640,
            height=160,
        )

    def step_time(self) -> vl.Spec | None:
        timed = self._timed()
        if timed.is_empty():
            return None
        per = (
            timed.group_by(["run", "stage"])
            .agg(
                pl.col("seconds").sum().round(3).alias("seconds"),
                pl.len().alias("units"),
                pl.col("rows_out").sum(),
            )
            .with_columns(rows_per_s=(pl.col("rows_out") / pl.col("seconds")).round(1))
        )
        return {
            **vl.chart(
                self.data(per.to_dicts()),
                "bar",
                y=self.stage_axis(),
                x=vl.quantitative(
                    "seconds", title="seconds of work (summed over units)", stack=True
                ),
                color=ATTEMPT_COLOR,
                tooltip=vl.tooltip(
                    vl.nominal("run"),
                    vl.nominal("stage"),
                    vl.quantitative("seconds"),
                    vl.quantitative("units"),
                    vl.quantitative("rows_per_s"),
                ),
            ),
            "width": 560,
        }

    # -- tokens, cost, errors -----------------------------------------------------------
    def _usage(self) -> pl.DataFrame:
        return self.computed.group_by(["run", "stage"]).agg(
            pl.col("prompt_tokens").sum(),
            pl.col("completion_tokens").sum(),
            pl.col("cost_usd").sum(),
            pl.col("requests").sum(),
            pl.col("retries").sum(),
        )

    def tokens(self) -> vl.Spec | None:
        usage = self._usage()
        if usage.is_empty() or not (
            usage["prompt_tokens"].sum() or usage["completion_tokens"].sum()
        ):
            self.empty_notes["tokens"] = "No LLM step computed anything in the recorded runs."
            return None
        long = usage.unpivot(
            on=["prompt_tokens", "completion_tokens"],
            index=["run", "stage"],
            variable_name="kind",
            value_name="tokens",
        ).with_columns(pl.col("kind").str.replace("_tokens", ""))
        return {
            **vl.chart(
                self.data(long.filter(pl.col("tokens") > 0).to_dicts()),
                "bar",
                y=self.stage_axis(),
                x=vl.total("tokens", title="tokens"),
                color=vl.nominal("kind", title=None),
                tooltip=vl.tooltip(
                    vl.nominal("run"),
                    vl.nominal("stage"),
                    vl.nominal("kind"),
                    vl.total("tokens", format=","),
                ),
            ),
            "width": 560,
        }

    def cost(self) -> vl.Spec | None:
        usage = self._usage()
        if usage.is_empty() or not usage["cost_usd"].sum():
            return None  # no prices known: no chart (the docs say where prices go)
        return {
            **vl.chart(
                self.data(usage.filter(pl.col("cost_usd") > 0).to_dicts()),
                "bar",
                y=self.stage_axis(),
                x=vl.total("cost_usd", title="USD"),
                color=ATTEMPT_COLOR,
                tooltip=vl.tooltip(
                    vl.nominal("run"), vl.nominal("stage"), vl.total("cost_usd", format=".4f")
                ),
            ),
            "width": 560,
        }

    def _errors(self) -> pl.DataFrame:
        failed = (
            self.units.filter(pl.col("status") == "failed")
            .group_by(["run", "stage", "error_kind"])
            .agg(pl.len().alias("count"), pl.col("error").first().alias("example"))
            .rename({"error_kind": "kind"})
            .with_columns(what=pl.lit("failed units"))
        )
        rows = [
            {"run": r["run"], "stage": r["stage"], "kind": kind, "count": n, "example": None}
            for r in self.computed.filter(pl.col("row_errors").is_not_null())
            .select(["run", "stage", "row_errors"])
            .iter_rows(named=True)
            for kind, n in json.loads(r["row_errors"]).items()
        ]
        schema = {
            "run": pl.String,
            "stage": pl.String,
            "kind": pl.String,
            "count": pl.Int64,
            "example": pl.String,
        }
        row_errors = (
            pl.DataFrame(rows, schema=schema, orient="row")
            .group_by(["run", "stage", "kind"])
            .agg(pl.col("count").sum(), pl.col("example").first())
            .with_columns(what=pl.lit("rows with an LLM error"))
        )
        return pl.concat([failed.cast({"count": pl.Int64}).select(row_errors.columns), row_errors])

    def errors(self) -> vl.Spec | None:
        errors = self._errors()
        if errors.is_empty():
            self.empty_notes["errors"] = "No errors: no unit failed and no row's LLM call failed."
            return None
        return {
            **vl.chart(
                self.data(errors.drop("example").to_dicts()),
                "bar",
                y=self.stage_axis(),
                x=vl.total("count", title="count"),
                color=vl.nominal("kind", title="kind"),
                column=vl.nominal("what", title=None),
                tooltip=vl.tooltip(
                    vl.nominal("run"),
                    vl.nominal("stage"),
                    vl.nominal("what"),
                    vl.nominal("kind"),
                    vl.total("count"),
                ),
            ),
            "width": 300,
        }

    def error_table(self) -> str:
        errors = self._errors()
        if errors.is_empty():
            return ""
        rows = errors.sort(["run", "stage", "count"], descending=[False, False, True])
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(r[c]) if r[c] is not None else '')}</td>"
                for c in ("run", "stage", "what", "kind", "count", "example")
            )
            + "</tr>"
            for r in rows.iter_rows(named=True)
        )
        return (
            "<table class=errors><tr><th>attempt</th><th>step</th><th>what</th><th>kind</th>"
            f"<th>count</th><th>first message</th></tr>{body}</table>"
        )

    # -- the data ------------------------------------------------------------------------
    def _generated(self) -> list[tuple[int, str]]:
        """(stage, column) of every column an LLM step writes, its bookkeeping aside."""
        out = []
        for s in self.plan.stages:
            for op in s.operators:
                if not op.uses_serving:
                    continue
                for c in op.writes():
                    if not any(c.endswith(x) for x in (*SUFFIXES, "_raw")):
                        out.append((s.index, c))
        return out

    def frame(self, stage: int) -> pl.DataFrame | None:
        """The first SAMPLE_VALUES rows of up to SAMPLE_UNITS of the stage's outputs,
        spread over its batches (only the row groups holding them are read)."""
        if stage in self._frames:
            return self._frames[stage]
        name = self.stage_names[stage]
        files = (
            self.latest.filter(
                pl.col("stage") == name, pl.col("rows_out") > 0, pl.col("file").is_not_null()
            )
            .sort(["batch", "piece"])
            .get_column("file")
            .to_list()
        )
        step = max(len(files) // SAMPLE_UNITS, 1)
        frames = []
        directory = self.plan.stage_dir(stage)
        for name_ in files[::step][:SAMPLE_UNITS]:
            try:
                frames.append(self.plan.store.read_rows(f"{directory}/{name_}", 0, SAMPLE_VALUES))
            except Exception as exc:  # removed since: the report shows what is there
                self.notes.append(f"{name_}: {one_line(exc)}")
        frame = pl.concat(frames, how="diagonal_relaxed") if frames else None
        if len(files) > SAMPLE_UNITS:
            self.notes.append(
                f"step {name}: data charts from {min(len(files), SAMPLE_UNITS)} of its "
                f"{len(files)} outputs"
            )
        self._frames[stage] = frame
        return frame

    def _column_values(self, numeric: bool) -> list[dict[str, Any]]:
        values: list[dict[str, Any]] = []
        for stage, column in self._generated():
            frame = self.frame(stage)
            if frame is None or column not in frame.columns:
                continue
            series = frame.get_column(column)
            if isinstance(series.dtype, pl.List):
                series = series.explode()
            series = series.drop_nulls().head(SAMPLE_VALUES)
            label = f"{self.stage_names[stage]}: {column}"
            if numeric and series.dtype.is_numeric():
                values += [{"column": label, "value": v} for v in series.to_list()]
            elif not numeric and series.dtype == pl.String:
                values += [{"column": label, "length": n} for n in series.str.len_chars().to_list()]
        return values

    def lengths(self) -> vl.Spec | None:
        values = self._column_values(numeric=False)
        if not values:
            self.empty_notes["lengths"] = "No LLM step wrote text in the store's outputs."
            return None
        return vl.grid_of(
            vl.chart(
                self.data(values),
                "bar",
                x=vl.quantitative("length", bin={"maxbins": 40}, title="characters"),
                y=vl.count(title="rows"),
                tooltip=vl.tooltip(vl.quantitative("length", bin=True), vl.count()),
            ),
            "column",
            columns=2,
            width=300,
            height=160,
        )

    def scores(self) -> vl.Spec | None:
        values = self._column_values(numeric=True)
        if not values:
            self.empty_notes["scores"] = "No judge or score step in the pipeline's outputs."
            return None
        return vl.grid_of(
            vl.chart(
                self.data(values),
                "bar",
                x=vl.ordinal("value", title="score"),
                y=vl.count(title="rows"),
                tooltip=vl.tooltip(vl.ordinal("value"), vl.count()),
            ),
            "column",
            columns=2,
            width=300,
            height=160,
        )

    def samples(self) -> str:
        parts = []
        for s in self.plan.stages:
            frame = self.frame(s.index)
            if frame is None or frame.is_empty():
                continue
            written = [c for op in s.operators for c in op.writes() if c in frame.columns]
            # what the step generated, then the rest, LLM bookkeeping and the row id last
            books = [c for c in frame.columns if c.endswith(SUFFIXES)]
            generated = [c for c in written if c not in books]
            rest = [c for c in frame.columns if c not in (*generated, *books, ROW_ID)]
            tail = [ROW_ID] if ROW_ID in frame.columns else []
            shown = frame.head(SAMPLE_ROWS).select([*generated, *rest, *books, *tail])
            head = "".join(
                f"<th{' class=gen' if c in generated else ''}>{html.escape(c)}</th>"
                for c in shown.columns
            )
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                for row in shown.iter_rows()
            )
            parts.append(
                f"<h3>{html.escape(s.name)}</h3><div class=scroll><table class=sample>"
                f"<tr>{head}</tr>{body}</table></div>"
            )
        notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in self.notes)
        return notes + ("".join(parts) or "<p class=empty>No output rows recorded yet.</p>")

    def attempts_table(self) -> str:
        if not self.records.attempts:
            return (
                "<p class=empty>No recorded runs of these steps in the store: run the "
                "pipeline (nightshift run) and build the report again.</p>"
            )
        counts = {
            (r["attempt"], r["status"]): r["len"]
            for r in self.units.group_by(["attempt", "status"]).len().iter_rows(named=True)
        }
        tokens = {
            r["attempt"]: r["t"]
            for r in self.computed.group_by("attempt")
            .agg((pl.col("prompt_tokens") + pl.col("completion_tokens")).sum().alias("t"))
            .iter_rows(named=True)
        }
        rows = []
        for a in self.records.attempts:
            key = str(a["attempt"])
            started, ended = a.get("started"), a.get("ended")
            took = f"{ended - started:,.1f} s" if started and ended else "did not end (killed?)"
            cells = [
                self.attempt_label[key],
                a.get("flow_run_id") or "",
                _utc(started),
                took,
                str(a.get("status")),
                *(
                    f"{counts.get((key, k), 0):,}"
                    for k in ("computed", "reused", "cached", "failed")
                ),
                f"{tokens.get(key, 0):,}",
            ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        return (
            "<table class=attempts><tr><th>attempt</th><th>flow run id</th><th>started</th>"
            "<th>took</th><th>status</th><th>units computed</th><th>reused</th><th>cached</th>"
            f"<th>failed</th><th>tokens</th></tr>{''.join(rows)}</table>"
        )


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _utc(seconds: float | None) -> str:
    if not seconds:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:0} h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:18px 0 6px} .meta{color:#666} .note,.empty{color:#666}
table{border-collapse:collapse;font-size:12.5px} td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top} th{background:#f4f4f4} th.gen{background:#e3eefc}
.scroll{overflow-x:auto} table.sample td{min-width:5em;max-width:420px;white-space:pre-wrap;
overflow-wrap:anywhere}
"""

_RENDER = """
const charts = document.querySelectorAll('.chart');
for (const el of charts) {
  const spec = JSON.parse(document.getElementById(el.dataset.spec).textContent);
  try {
    await window.vegaEmbed(el, spec, {renderer: 'svg', actions: false});
    el.dataset.rendered = 'yes';
  } catch (e) {
    console.error('chart ' + el.id + ': ' + e);
    el.textContent = 'this chart could not be drawn: ' + e;
  }
}
document.body.dataset.charts = 'done';
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{style}</style></head>
<body>
<h1>{heading}: run report</h1>
<p class=meta>generated {generated} by nightshift report; every asset is in this file.</p>
<h2>Attempts</h2>
{attempts}
{sections}
{errors}
<h2>Sample rows per step (generated columns first)</h2>
{samples}
{specs}
<script type="module">{bundle}</script>
<script type="module">{render}</script>
</body></html>
"""
