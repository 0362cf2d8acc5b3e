import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_pairs, write_jsonl

from treg_core.errors import UserError
from treg_data.inputs import HubSource, InvalidRow, open_source, worker_range


def _ids(source, start=0, stop=None):
    rows = source.rows(start, source.num_rows if stop is None else stop)
    return [row["id"] if isinstance(row, dict) else row.reason for _, row in rows]


def test_jsonl_parquet_and_json_array_read_the_same_rows(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "Q", "chosen": "A", "rejected": f"B{i}"} for i in range(7)]
    jsonl = open_source(write_jsonl(tmp_path / "d.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    array = open_source(str(tmp_path / "a.json"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=3)
    parquet = open_source(str(tmp_path / "p.parquet"))
    expected = [r["id"] for r in rows]
    for source in (jsonl, array, parquet):
        assert source.num_rows == 7
        assert _ids(source) == expected
        assert _ids(source, 2, 5) == expected[2:5]


def test_a_folder_of_files_is_read_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"id": "b0"}])
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a0"}, {"id": "a1"}])
    source = open_source(str(tmp_path))
    assert _ids(source) == ["a0", "a1", "b0"]
    assert _ids(source, 1, 3) == ["a1", "b0"]


def test_broken_lines_become_invalid_rows_with_a_location(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "ok"}\n{oops\n\n[1, 2]\n')
    rows = [row for _, row in open_source(str(path)).rows(0, 3)]
    assert rows[0] == {"id": "ok"}
    assert isinstance(rows[1], InvalidRow) and rows[1].reason == "invalid_json" and rows[1].id == "d.jsonl record 2"
    assert isinstance(rows[2], InvalidRow) and rows[2].reason == "malformed_row"


def test_datasets_loader_path(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    plain = [row for row in make_pairs(24) if isinstance(row.get("prompt"), str) and isinstance(row["chosen"], str)]
    pq.write_table(pa.Table.from_pylist(plain[:6]), folder / "train.parquet")
    source = HubSource(str(folder), "train", None)
    assert source.num_rows == 6
    assert _ids(source, 1, 3) == [plain[1]["id"], plain[2]["id"]]


def test_unknown_dataset_and_unsupported_files_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot load dataset"):
        open_source("no-such-org/no-such-dataset")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="expected .json"):
        open_source(str(tmp_path / "x.csv"))


@pytest.mark.parametrize("num_rows, workers", [(0, 3), (10, 3), (7, 7), (5, 8), (1000, 16)])
def test_worker_ranges_cover_every_row_once(num_rows, workers):
    covered = [i for w in range(workers) for i in range(*worker_range(num_rows, workers, w))]
    assert covered == list(range(num_rows))


def test_worker_index_out_of_range():
    with pytest.raises(UserError, match="worker-index"):
        worker_range(10, 2, 2)
