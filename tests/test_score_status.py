"""`treg-score --status DIR`: a folder of three workers, really scored, where worker 0 finished, worker 1 was cut off
after its first shard (what a kill leaves: no worker manifest, the shards before the kill) and worker 2 never ran.
--status reports each, prints the SLURM resubmission, and that resubmission, run through the array script, finishes
the folder."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import assert_one_line_error, make_learnable_pairs, run, score_command

from treg_core.errors import UserError
from treg_data.config import ScoreConfig, validate
from treg_data.status import FINISHED, IN_PROGRESS, NOT_STARTED, FolderStatus, WorkerStatus, array_list, folder_status

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines/launch/score_slurm_array.sh"
PAIRS, WORKERS, SHARD_SIZE = 12, 3, 2  # 4 input rows per worker: 2 shards each


@pytest.fixture(scope="module")
def partial(tiny_model, tmp_path_factory):
    """(folder, recipe, input): worker 0 finished, worker 1 holds its first shard only, worker 2 never ran."""
    root = tmp_path_factory.mktemp("status")
    data = root / "pairs.parquet"  # Parquet: its footer gives the row count without reading the rows
    pq.write_table(pa.Table.from_pylist(make_learnable_pairs(PAIRS)), data)
    recipe = root / "score.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": tiny_model, "dataset": str(data), "output": str(root / "scored"), "backend": "hf",
        "dtype": "float32", "max_length": 256, "max_prompt_length": 128, "batch_size": 4, "shard_size": SHARD_SIZE,
        "reward_check": False}))
    workers = [subprocess.Popen([str(a) for a in score_command("--config", recipe, "--num-workers", WORKERS,
                                                               "--worker-index", index)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in (0, 1)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
    folder = root / "scored"
    (folder / "manifests" / "worker-00001-of-00003.json").unlink()
    (folder / "data" / "train-00001-of-00003-00001.parquet").unlink()
    return folder, recipe, data


def status(folder) -> subprocess.CompletedProcess:
    return run(score_command("--status", folder), timeout=120)


@pytest.mark.slow
def test_status_reports_each_worker_and_the_resubmission(partial):
    folder, _, data = partial
    files = _listing(folder)
    result = status(folder)
    assert result.returncode == 3, result.stderr[-3000:]
    assert _listing(folder) == files  # nothing written, not even a lock file
    lines = result.stdout.splitlines()
    assert lines[0] == f"{folder}: unfinished, 1 of 3 workers finished"
    assert f"  dataset   {data}, {PAIRS} rows" in lines
    assert "  layout    split train, 3 workers, shards of 2 rows" in lines
    assert "  worker 0  finished: 4 rows scored, 0 skipped, 2 complete shards" in lines
    assert "  worker 1  in progress: 1 complete shard, 2 of 4 input rows done (2 rows scored, 0 skipped)" in lines
    assert "  worker 2  not started" in lines
    assert ("  a SLURM array:        sbatch --array=1-2 --export=ALL,NUM_WORKERS=3 "
            "pipelines/launch/score_slurm_array.sh CONFIG") in lines
    assert "--num-workers 3 --worker-index I, for I in 1-2" in result.stdout
    assert lines[-1] == "(exit code 3: unfinished)"


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(path), path.stat().st_mtime_ns) for path in [folder, *folder.rglob("*")])


def test_without_a_row_count_status_says_rows_done_only(partial):
    """A JSON or Hub input is counted only by reading it: with the input out of reach, a slice's size is unknown."""
    folder, _, data = partial
    away = data.with_name("elsewhere.parquet")
    data.rename(away)
    try:
        report = folder_status(folder)
    finally:
        away.rename(data)
    assert report.input_rows is None
    assert report.workers[0].input_rows == 4  # a finished worker's manifest gives its slice
    assert report.workers[1].input_rows is None  # its end is where worker 2, which never ran, would start
    assert "  worker 1  in progress: 1 complete shard, 2 input rows done (2 rows scored, 0 skipped)" in report.text()
    assert "rows are counted only by reading it" in report.text()


def test_a_ray_run_is_continued_by_its_own_command(partial, tmp_path):
    folder = tmp_path / "scored"
    shutil.copytree(partial[0], folder)
    argv = ["treg-score", "--config", "my recipe.yaml", "--executor", "ray"]
    (folder / ".treg-ray.json").write_text(json.dumps({"argv": argv, "num_actors": 2, "num_workers": 3,
                                                        "ray_address": None}))
    report = folder_status(folder)
    assert "  a Ray run (2 actors on a local cluster): treg-score --config 'my recipe.yaml' --executor ray" \
        in report.text().splitlines()
    assert "sbatch" not in report.text() and report.exit_code == 3


@pytest.mark.slow
def test_the_printed_array_resubmission_finishes_the_folder(partial, tmp_path):
    folder, recipe, _ = partial
    copy = tmp_path / "scored"
    shutil.copytree(folder, copy)
    settings = yaml.safe_load(recipe.read_text())
    (tmp_path / "score.yaml").write_text(yaml.safe_dump({**settings, "output": str(copy)}))
    advice = re.search(r"sbatch --array=(\S+) --export=ALL,NUM_WORKERS=(\d+) (\S+) CONFIG",
                       folder_status(copy).text())
    tasks, workers = _expand(advice.group(1)), advice.group(2)
    slurm = {"SLURM_ARRAY_TASK_COUNT": str(len(tasks)), "SLURM_ARRAY_TASK_MIN": str(tasks[0]),
             "SLURM_ARRAY_TASK_MAX": str(tasks[-1]), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # Without NUM_WORKERS the array's size (2) is no worker count: the script refuses before scoring anything.
    refused = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "score.yaml")], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **slurm, "SLURM_ARRAY_TASK_ID": str(tasks[0])})
    assert refused.returncode == 2 and "NUM_WORKERS=N" in refused.stderr, refused.stderr[-2000:]
    runs = [subprocess.Popen(["bash", str(ROOT / advice.group(3)), str(tmp_path / "score.yaml")],
                             env={**os.environ, **slurm, "NUM_WORKERS": workers, "SLURM_ARRAY_TASK_ID": str(task)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in tasks]
    for task in runs:
        _, stderr = task.communicate(timeout=600)
        assert task.returncode == 0, stderr[-3000:]
    result = status(copy)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{copy}: finished, 3 of 3 workers finished"
    assert any(line.startswith(f"  totals    {PAIRS} pairs read, {PAIRS} scored, 0 skipped") for line in lines)
    assert "  worker 1  finished: 4 rows scored, 0 skipped, 2 complete shards" in lines
    assert "exit code" not in result.stdout and "sbatch" not in result.stdout


def _expand(array: str) -> list[int]:
    """SLURM's --array list as task ids: 1,3-5 -> [1, 3, 4, 5]."""
    ids = []
    for part in array.split(","):
        low, _, high = part.partition("-")
        ids += range(int(low), int(high or low) + 1)
    return ids


def test_array_lists_are_compressed():
    assert array_list([9, 1, 4, 3, 5]) == "1,3-5,9"
    assert array_list([0]) == "0"
    assert array_list(list(range(64))) == "0-63"
    assert _expand(array_list([2, 7, 8, 9, 11, 12])) == [2, 7, 8, 9, 11, 12]


def test_many_workers_are_summarised():
    workers = [WorkerStatus(i, FINISHED, 1, 10, 1, 11, 11) for i in range(52)]
    workers += [WorkerStatus(i, IN_PROGRESS, 1, 5, 0, 5, 11) for i in (52, 53, 57)]
    workers += [WorkerStatus(i, NOT_STARTED, input_rows=11) for i in (54, 55, 56, *range(58, 64))]
    report = FolderStatus(Path("out"), _provenance(64), workers, 704, None, None)
    lines = report.text().splitlines()
    assert "  workers   12 of 64 unfinished" in lines
    assert "  finished:    52, 572 of 572 input rows done (520 rows scored, 52 skipped)" in lines
    assert "  in progress: 3 (52-53,57), 15 of 33 input rows done (15 rows scored, 0 skipped)" in lines
    assert "  not started: 9 (54-56,58-63)" in lines
    assert not any(line.startswith("  worker ") for line in lines)  # no line per worker
    assert "sbatch --array=52-63 --export=ALL,NUM_WORKERS=64" in report.text()
    assert report.exit_code == 3


def _provenance(workers: int):
    from treg_core.contract import Provenance

    names = Provenance.__dataclass_fields__
    values = {name: "x" for name in names} | {"num_workers": workers, "shard_size": 10, "dataset_config": None}
    return Provenance(**values)


def test_folders_treg_score_did_not_write_are_refused(partial, tmp_path):
    assert_one_line_error(status(tmp_path / "missing"), "no such folder")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by treg-score"):
        folder_status(tmp_path / "theirs")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".treg").write_text("treg-train\n")
    with pytest.raises(UserError, match="holds treg-train output"):
        folder_status(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".treg").write_text("treg-score\n")
    report = folder_status(tmp_path / "empty")
    assert report.text().startswith(f"{tmp_path / 'empty'}: nothing is scored yet") and report.exit_code == 3
    assert folder_status(partial[0] / "data").root == partial[0]  # its data/ folder names it too
    assert validate(ScoreConfig(status=str(partial[0]))).status  # --status alone: nothing else is required
