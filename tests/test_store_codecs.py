"""Fixed costs and bytes of the store: each stage's codec (lz4 for CPU stages, zstd for
LLM stages) without touching its keys, and the store's result-storage block saved once,
not at every run's start."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_rows, write_jsonl

from nightshift.blocks.step_store import StepStore
from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Filter, Generate


def codecs(folder: Path) -> set[str]:
    return {
        pq.ParquetFile(f).metadata.row_group(0).column(0).compression
        for f in folder.glob("*.parquet")
    }


def test_cpu_stages_write_lz4_llm_stages_zstd_and_a_rerun_reuses_them(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(30, "c"))
    p = Pipeline(
        "codecs",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[Filter(where="n <> 3"), Generate(prompt="{{ text }}", output="a")],
        store=f"file://{tmp_path}/store",
        batch_size=10,
        serving={"default": {"backend": "fake", "model": "echo"}},
    )
    p.run()
    steps = tmp_path / "store" / "codecs" / "steps"
    assert codecs(steps / "00-filter") == {"LZ4"}
    assert codecs(steps / "01-generate") == {"ZSTD"}
    assert p.read().height == 29
    summary = p.run()  # the codec is in no key: everything is reused
    assert [s["units_computed"] for s in summary["steps"]] == [0, 0]


def test_the_result_storage_block_is_saved_only_when_missing_or_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves: list[str] = []
    original = StepStore.save

    def counting_save(self: StepStore, *args: object, **kwargs: object) -> object:
        saves.append(self.url)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StepStore, "save", counting_save)
    url = f"file://{tmp_path}/store"
    first = StepStore(url=url).as_result_storage()
    again = StepStore(url=url).as_result_storage()  # the next run of the same store
    assert len(saves) == 1 and again._block_document_id == first._block_document_id
    changed = StepStore(url=url, storage_options={"auto_mkdir": True}).as_result_storage()
    assert len(saves) == 2, "a store whose settings changed is saved again"
    assert StepStore.load(changed._block_document_name).storage_options == {"auto_mkdir": True}
