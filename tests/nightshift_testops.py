"""Operators for orchestration tests: they log every invocation to a file.

The log path comes from the environment (``NIGHTSHIFT_TEST_LOG``), not the config, so it
does not change fingerprints; so does ``NIGHTSHIFT_TEST_FAIL_<TAG>`` (a ``_row_id`` whose
batch fails, to inject a transient failure). Each line: tag, pid, first ``_row_id``, rows, start and end.
"""

from __future__ import annotations

import json
import os
import time

import polars as pl

from nightshift.tasks.operators import ROW_ID, Operator, register_operator


@register_operator
class Count(Operator):
    name = "count"
    tag: str = "count"
    sleep: float = 0.0

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        if df.height == 0:
            return df.with_columns(pl.lit(self.tag).alias(f"seen_{self.tag}"))
        started = time.time()
        if self.sleep:
            time.sleep(self.sleep)
        fail_row = os.environ.get(f"NIGHTSHIFT_TEST_FAIL_{self.tag.upper()}")
        if fail_row and int(fail_row) in df[ROW_ID].to_list():
            raise ValueError(f"bad value in row {fail_row}")
        path = os.environ.get("NIGHTSHIFT_TEST_LOG")
        if path:
            entry = {
                "tag": self.tag,
                "pid": os.getpid(),
                "first": int(df[ROW_ID].min()),
                "rows": df.height,
                "start": started,
                "end": time.time(),
            }
            with open(path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        return df.with_columns(pl.lit(self.tag).alias(f"seen_{self.tag}"))


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
