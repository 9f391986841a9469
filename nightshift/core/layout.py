"""Where everything lives in a step store: every path of the layout is built here.

Layout under the root (stable; any Parquet tool can read it)::

    <root>/<pipeline>[/<partition>]/sources/<stem>-<identity>.parquet   staged JSONL/CSV inputs
    <root>/<pipeline>/steps/<stage>/<stem>-<start>[_<piece>]-<key16>.parquet   one per unit
    <root>/<pipeline>/steps/<stage>/manifest.json      written when the stage completes
    <root>/<pipeline>/steps/<stage>/outputs.json       output index (core/inventory.py)
    <root>/<pipeline>/barriers/<stage>-<key16>.parquet state of a barrier step (dedup index)
    <root>/<pipeline>/answers/<stage>/<stem>-<start>-<key16>/   LLM answers of a unit in progress
    <root>/<pipeline>/runs/<attempt>/attempt.json     one run attempt: who, when, per-stage totals, cost
    <root>/<pipeline>/runs/<attempt>/units[-<seq>].parquet   its per-unit records (timings, tokens, errors)
    <root>/<pipeline>/runs/<attempt>/report.html       the run report written at its end
    <root>/<pipeline>/provider-batches/<stage>/<stem>-<start>-<key16>/<part>-<attempt>.json
                                                       a unit's provider batches (mode: batch)
    <root>/<stream>/windows/<first>-<last>.json        stream window journal
    <root>/<stream>/windows/<id>-<key16>.parquet       a window's decoded rows
    <root>/<stream>/steps/<stage>/w-<id>-<key16>.parquet   a window's output at a stage
    <root>/<stream>/<sink path>/w-<first>-<last>.parquet   the stream store sink
    <root>/_prefect/<cache key>                        Prefect result records (small refs)
    <root>/_locks/<cache key>.lock                     transaction locks (local stores)

``<stage>`` is ``NN-<operators>`` on a pipeline's trunk, else its steps' names; a name
longer than :data:`MAX_NAME_BYTES` is cut and ends in a hash of the whole name
(:func:`capped`), so a long chain of fused steps never exceeds what file systems allow.
Names within the limit are used as they are (the layout of existing stores is kept).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: The longest name (UTF-8 bytes) of a folder or file stem the layout makes; file systems
#: allow 255 per name, and a unit's file name adds its batch start and key to the stem.
MAX_NAME_BYTES = 120

RECORDS = "_prefect"
LOCKS = "_locks"
INDEX_NAME = "outputs.json"
RUNS = "runs"
ATTEMPT_NAME = "attempt.json"
REPORT_NAME = "report.html"
MANIFEST_NAME = "manifest.json"


def capped(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` itself when it fits in ``limit`` bytes, else its beginning (cut at a
    character boundary) and ``~`` and 12 hex digits of the whole name's sha256: readable,
    and two long names that share a beginning still differ."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    tag = hashlib.sha256(raw).hexdigest()[:12]
    head = raw[: limit - len(tag) - 1].decode(errors="ignore").rstrip("+-_.")
    return f"{head}~{tag}"


def unit_name(label: str, key: str) -> str:
    """The file of one unit: ``<stem>-<start>[_<piece start>]-<key16>.parquet``."""
    return f"{capped(label)}-{key[:16]}.parquet"


def answers_dir(out_path: str) -> str:
    """``…/steps/<stage>/<unit>.parquet`` -> ``…/answers/<stage>/<unit>``."""
    head, sep, tail = out_path.rpartition("/steps/")
    if not sep:
        raise ValueError(f"not a step output path: {out_path}")
    return f"{head}/answers/{tail.removesuffix('.parquet')}"


PROVIDER_BATCHES = "provider-batches"


def provider_batches_dir(out_path: str) -> str:
    """``…/steps/<stage>/<unit>.parquet`` -> ``…/provider-batches/<stage>/<unit>``: the
    records of the provider batches holding that unit's requests (``mode: batch``)."""
    head, sep, tail = out_path.rpartition("/steps/")
    if not sep:
        raise ValueError(f"not a step output path: {out_path}")
    return f"{head}/{PROVIDER_BATCHES}/{tail.removesuffix('.parquet')}"


@dataclass(frozen=True)
class StoreLayout:
    """The paths under one store root (a local path or ``bucket/prefix``)."""

    root: str

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def result_record(self, key: str) -> str:
        return self.join(RECORDS, key)

    def locks_dir(self) -> str:
        return self.join(LOCKS)

    def pipeline(self, name: str, partition: str | None = None) -> PipelineLayout:
        """A batch pipeline's (or a partition's) folder."""
        return PipelineLayout(self.join(name, partition) if partition else self.join(name))

    def stream(self, name: str) -> StreamLayout:
        return StreamLayout(self.join(name))


@dataclass(frozen=True)
class PipelineLayout:
    """The paths of one batch pipeline (or one partition of it)."""

    base: str

    def sources_dir(self) -> str:
        return f"{self.base}/sources"

    def staged_source(self, name: str) -> str:
        return f"{self.sources_dir()}/{name}"

    def stage_dir(self, stage_name: str) -> str:
        return f"{self.base}/steps/{capped(stage_name)}"

    def barriers_dir(self) -> str:
        return f"{self.base}/barriers"

    def provider_batches_dir(self) -> str:
        """Every unit's provider batch records: ``<stage>/<unit>/<part>-<attempt>.json``."""
        return f"{self.base}/{PROVIDER_BATCHES}"

    def barrier_file(self, stage_name: str, key: str) -> str:
        return f"{self.barriers_dir()}/{capped(stage_name)}-{key[:16]}.parquet"

    def runs_dir(self) -> str:
        """Where run attempts record what they did (``flows/recording.py``)."""
        return f"{self.base}/{RUNS}"

    def attempt_dir(self, attempt: str) -> str:
        """One attempt of a flow run: ``<UTC start>-<flow run id, 8 hex>-a<attempt>``."""
        return f"{self.runs_dir()}/{attempt}"

    def attempt_file(self, attempt: str) -> str:
        return f"{self.attempt_dir(attempt)}/{ATTEMPT_NAME}"

    def unit_records(self, attempt: str, seq: int | None = None) -> str:
        """An attempt's unit records: chunks ``units-<seq>.parquet`` written while it
        runs, compacted into ``units.parquet`` when it ends."""
        name = "units.parquet" if seq is None else f"units-{seq:06d}.parquet"
        return f"{self.attempt_dir(attempt)}/{name}"

    def report_file(self, attempt: str) -> str:
        return f"{self.attempt_dir(attempt)}/{REPORT_NAME}"


@dataclass(frozen=True)
class StreamLayout:
    """The paths of one stream pipeline (docs/streaming.md)."""

    base: str

    def windows_dir(self) -> str:
        return f"{self.base}/windows"

    def window_entry(self, window_id: str) -> str:
        return f"{self.windows_dir()}/{window_id}.json"

    def window_input(self, window_id: str, key: str) -> str:
        return f"{self.windows_dir()}/{window_id}-{key[:16]}.parquet"

    def step_output(self, stage_name: str, window_id: str, key: str) -> str:
        return f"{self.base}/steps/{capped(stage_name)}/w-{window_id}-{key[:16]}.parquet"

    def sink_dir(self, path: str) -> str:
        return f"{self.base}/{path}"


def manifest(directory: str) -> str:
    return f"{directory}/{MANIFEST_NAME}"


def outputs_index(directory: str) -> str:
    return f"{directory}/{INDEX_NAME}"
