"""``pick_best``: keep the best of a row's candidates by their scores (best-of-n).

The usual shape: ``generate`` with ``n`` writes a list of candidates, ``judge``/``score``
over that list writes a list of scores (one request per candidate), and ``pick_best``
keeps the candidate with the highest score and that score::

    steps:
      - generate:  {prompt: "Write a title for: {{ text }}", output: titles, n: 4, temperature: 0.8}
      - judge:     {input: titles, rubric: "catchiness", output: title_scores}
      - pick_best: {candidates: titles, scores: title_scores, output: title}

writes ``title`` and ``title_score``. Ties go to the earliest candidate (the lowest
sample index); candidates whose score is null (a judge error) are never picked; a row
with no scored candidate gets nulls. ``lowest: true`` keeps the lowest score instead.
"""

from __future__ import annotations

import polars as pl

from nightshift.core.errors import SpecError
from nightshift.tasks.operators.base import ROW_ID, Operator, register_operator
from nightshift.tasks.operators.llm_inputs import is_list


@register_operator
class PickBest(Operator):
    """``pick_best: {candidates: titles, scores: title_scores, output: title}``."""

    name = "pick_best"
    candidates: str
    scores: str
    output: str
    #: keep the candidate with the lowest score (a rank, a cost) instead of the highest
    lowest: bool = False

    def reads(self) -> list[str]:
        return [self.candidates, self.scores]

    def writes(self) -> list[str]:
        return [self.output, f"{self.output}_score"]

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        for column in (self.candidates, self.scores):
            if not is_list(df.schema[column]):
                raise SpecError(f"pick_best: column '{column}' must be a list column, not {df.schema[column]}")
        if not df.schema[self.scores].inner.is_numeric():  # type: ignore[union-attr]
            raise SpecError(f"pick_best: scores column '{self.scores}' must hold numbers, not {df.schema[self.scores]}")
        sizes = pl.col(self.candidates).list.len() != pl.col(self.scores).list.len()
        bad = df.filter(sizes.fill_null(False))
        if bad.height:
            row_id = bad[ROW_ID][0] if ROW_ID in bad.columns else None
            raise SpecError(
                f"pick_best: {bad.height} row(s) have a different number of candidates "
                f"('{self.candidates}') and scores ('{self.scores}'); first: {ROW_ID} {row_id}"
            )
        scores = pl.col(self.scores)
        best = scores.list.arg_min() if self.lowest else scores.list.arg_max()
        return df.with_columns(
            pl.col(self.candidates).list.get(best, null_on_oob=True).alias(self.output),
            scores.list.get(best, null_on_oob=True).alias(f"{self.output}_score"),
        )
