"""The pipeline spec: YAML (or a dict from a deployment parameter) validated by pydantic.

Example::

    name: translate-nightly
    source: {path: "data/*.jsonl"}
    batch_size: 2000
    store: {url: "file://./.nightshift"}     # or {block: prod} (a StepStore block)
    steps:
      - filter:   {where: "length(text) > 20"}          # name: filter (by default)
      - template: {output: prompt, template: "Translate to French:\\n{{ text }}"}
      - dedup:    {on: [prompt]}

Nothing in a spec is evaluated as Python: expressions are SQL parsed by polars, templates
render in Jinja's sandbox, operators are looked up by name (an ``module:Class`` import path
only when the run allows imports). Every error names the key path at fault, in one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nightshift.blocks.loading import load_block
from nightshift.blocks.serving_config import (
    BackendConfig,
    ServingConfig,
    VLLMEngineConfig,
    parse_serving,
)
from nightshift.blocks.step_store import StepStore, check_url
from nightshift.core.errors import SpecError, StoreError, one_line
from nightshift.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    validation_message,
)
from nightshift.tasks.dag import StepNode, build_nodes
from nightshift.tasks.operators import Operator
from nightshift.tasks.runner_choice import DaskOptions, RunnerKind
from nightshift.tasks.sources import SourceSpec

#: Keys whose values are credentials (fsspec/s3fs options, serving configs).
SECRET_KEYS = frozenset(
    {
        "api_key",
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "access_key_id",
        "secret_access_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false; ``on``, ``yes``, ``no`` stay strings.

    A key given twice in one mapping is an error (PyYAML keeps the last one silently).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *base`` overrides on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: SafeConstructor reports it
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {earlier.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


class StoreSpec(BaseModel):
    """``{url: ...}`` or ``{block: NAME}`` (a saved Nightshift Step Store block)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    block: str | None = None
    endpoint_url: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url)

    @model_validator(mode="after")
    def _one_of(self) -> StoreSpec:
        if (self.url is None) == (self.block is None):
            raise ValueError("give exactly one of 'url' or 'block'")
        return self

    def resolve(self) -> StepStore:
        if self.url is not None:
            return StepStore(
                url=self.url, endpoint_url=self.endpoint_url, storage_options=self.storage_options
            )
        assert self.block is not None  # the validator: exactly one of url or block
        return load_block(StepStore, self.block, "store.block", StoreError)


class PipelineSpec(BaseModel):
    """A whole pipeline: source, batching, store and the ordered operator steps."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    source: SourceSpec
    batch_size: PositiveInt = 10_000
    store: StoreSpec = Field(default_factory=lambda: StoreSpec(url="file://./.nightshift"))
    #: ``{operator: config}`` entries, each with an optional ``name:`` and ``after:``
    #: (steps as a DAG: ``tasks/dag.py``); without ``after`` a step follows the one before.
    steps: list[dict[str, Any]] = Field(min_length=1)
    #: Consecutive cheap row-local operators share one task (one persisted output).
    fuse: bool = True
    #: Batches with a task running or queued at once (pipelining depth).
    max_in_flight: PositiveInt = 8
    #: Threads running step tasks (task_runner: thread).
    workers: PositiveInt = 4
    #: Row-level hand-over between consecutive LLM steps on an in-process engine: a
    #: row's next-step request goes into the engine as soon as its reply is there
    #: (docs/generation.md). Changes when work reaches the engine, never an output.
    handover: bool = True
    #: Where step tasks run: threads in the flow process, or a Dask cluster.
    task_runner: RunnerKind = "thread"
    dask: DaskOptions | None = None
    #: LLM backends by name (``default`` is the embedded SmolLM2 on vLLM when absent):
    #: one backend's settings as a mapping (``backend:`` picks which: vllm,
    #: openai_compatible, fake), or ``{block: NAME}`` for a saved serving block.
    serving: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: The most one run may spend on LLM calls (US dollars, at the serving configs'
    #: ``price``): past it the run sends nothing new, finishes what is in flight and ends
    #: saying what is left; the next run resumes. None: no cap.
    budget: NonNegativeFloat | None = None
    #: Prefect task retries for a failing batch.
    retries: NonNegativeInt = 0
    retry_delay_seconds: NonNegativeFloat = 2.0
    #: A path segment after the pipeline name in every store path (e.g. ``date=2026-11-22``).
    partition: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$", max_length=100
    )

    @model_validator(mode="after")
    def _no_secrets(self) -> PipelineSpec:
        """A spec is a flow-run parameter, shown in the UI: it must hold no secret."""
        places = {
            **{f"serving.{n}.{k}": v for n, e in self.serving.items() for k, v in e.items()},
            **{f"store.storage_options.{k}": v for k, v in self.store.storage_options.items()},
            **{f"source.storage_options.{k}": v for k, v in self.source.storage_options.items()},
        }
        for place, value in places.items():
            if place.rsplit(".", 1)[-1].lower() in SECRET_KEYS and value is not None:
                raise ValueError(
                    f"{place}: a spec is shown in the Prefect UI and must not hold secrets; "
                    "use a saved block (store: {block: NAME}, serving: {NAME: {block: NAME}}), "
                    "api_key_secret / api_key_env, or the environment"
                )
        return self

    def operators(self, allow_imports: bool = False) -> list[Operator]:
        """Instantiate every step's operator; errors name ``steps[i].name.key``."""
        return [node.operator for node in self.step_nodes(allow_imports)]

    def step_nodes(self, allow_imports: bool = False) -> list[StepNode]:
        """The steps as a DAG (names, parents), checked: ``tasks/dag.py``."""
        return build_nodes(self.steps, allow_imports)


def resolve_serving(
    serving: dict[str, dict[str, Any]], operators: list[Operator]
) -> dict[str, BackendConfig]:
    """The serving configs that the LLM steps use, by name, from a spec's ``serving:``
    section (a pipeline's or a stream spec's): a mapping of fields, or ``{block: NAME}``
    for a saved config."""
    used: dict[str, int] = {}
    for i, op in enumerate(operators):
        if op.uses_serving:
            # an LLM step (uses_serving) declares ``serving``; the base Operator does not
            used.setdefault(getattr(op, "serving"), i)  # noqa: B009
    configs: dict[str, BackendConfig] = {}
    for name, step in used.items():
        entry = serving.get(name)
        if entry is None:
            if name != "default":
                raise SpecError(
                    f"steps[{step}]: serving {name!r} is not defined under 'serving:' "
                    f"(defined: {', '.join(sorted(serving)) or 'none'})"
                )
            configs[name] = VLLMEngineConfig()
        elif isinstance(entry, Mapping) and "block" in entry:
            if len(entry) > 1:
                extra = next(k for k in entry if k != "block")
                raise SpecError(
                    f"serving.{name}.{extra}: a saved block is named alone "
                    f"({{block: NAME}}); set {extra} in the block"
                )
            configs[name] = load_block(
                ServingConfig, entry["block"], f"serving.{name}.block"
            ).settings
        else:
            configs[name] = parse_serving(entry, f"serving.{name}")
    return configs


def read_spec_mapping(source: str | Path | dict[str, Any]) -> tuple[str, Any]:
    """``(origin, data)``: a YAML file's content (origin: its path) or a given mapping.

    Unreadable files and bad YAML raise a one-line SpecError naming the file, line and
    column.
    """
    if not isinstance(source, (str, Path)):
        return "spec", source
    origin = str(source)
    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise SpecError(f"{origin}: cannot read spec: {exc.strerror}") from None
    try:
        return origin, yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        problem = getattr(exc, "problem", None) or one_line(exc)
        raise SpecError(f"{where}: invalid YAML: {problem}") from None


def load_spec(source: str | Path | dict[str, Any] | PipelineSpec) -> PipelineSpec:
    """A validated spec from a YAML file path, a dict or a spec; errors are one line."""
    if isinstance(source, PipelineSpec):
        return source
    origin, data = read_spec_mapping(source)
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a spec must be a mapping with name, source and steps")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{origin}: {validation_message(exc)}") from None
