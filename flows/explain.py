"""Why a run reuses or recomputes: one log line per stage, before any batch runs.

Each stage is compared with the manifest its last completed run left in the store:

* same fingerprint: the step is unchanged; batches already in the store are reused and
  the others (new source files, deleted or unreadable outputs) are computed;
* another fingerprint: the steps whose config changed are named (or "code, model or
  upstream" when the configs are equal: an operator's code version, the model behind
  it, or an earlier step changed), and every batch of that stage recomputes;
* no manifest: the stage never completed under this store and partition;
* forced: ``resume_step``/``--fresh`` asked for it.

Checking costs one directory listing and one small JSON read per stage.
"""

from __future__ import annotations

from typing import Any

from flows.plan import Plan


def explain(plan: Plan, force_from: int | None) -> list[str]:
    """One line per stage: what this run will reuse and why the rest is computed."""
    return [_explain_stage(plan, stage.index, force_from) for stage in plan.stages]


def _explain_stage(plan: Plan, index: int, force_from: int | None) -> str:
    stage = plan.stages[index]
    total = len(plan.batches)
    name = f"step {stage.dirname}"
    if force_from is not None and index >= force_from:
        return f"{name}: recomputing all {total} batch(es), as asked (resume_step / --fresh)"
    present = _outputs_present(plan, index)
    missing = total - present
    manifest = plan.store.read_json(plan.manifest_path(index))
    if not isinstance(manifest, dict):
        why = "no earlier completed run of this step in the store"
    elif manifest.get("fingerprint") == stage.fingerprint:
        why = "step unchanged since its last completed run; new source batches or missing outputs"
    else:
        why = f"changed since its last completed run: {_what_changed(stage, manifest)}"
    if missing == 0:
        return f"{name}: all {total} batch(es) already in the store, reused"
    return f"{name}: {present} of {total} batch(es) reused, {missing} to compute ({why})"


def _outputs_present(plan: Plan, index: int) -> int:
    if not plan.batches:
        return 0
    directory = plan.out_path(index, 0).rsplit("/", 1)[0]
    try:
        names = {p.rsplit("/", 1)[-1] for p in plan.store.fs.ls(directory, detail=False)}
    except FileNotFoundError:
        return 0
    return sum(plan.out_path(index, b).rsplit("/", 1)[-1] in names for b in range(len(plan.batches)))


def _what_changed(stage: Any, manifest: dict[str, Any]) -> str:
    before = manifest.get("steps") or []
    now = [op.spec_entry() for op in stage.operators]
    changed = [
        f"steps[{stage.first_step + i}] ({next(iter(entry))}) config"
        for i, entry in enumerate(now)
        if i >= len(before) or before[i] != entry
    ]
    return ", ".join(changed) if changed else "operator code, model or an upstream step"
