"""treg-score --executor ray on a real local Ray cluster (the machine's CPUs), with two scoring actors: the rows
equal one local worker's, with both back-ends, and a run killed mid-way continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from helpers import bad_rows, make_pairs, read_shard_rows, run, score_command, write_jsonl

from treg_core.errors import UserError
from treg_data.config import ScoreConfig, validate

pytest.importorskip("ray.data")
pytestmark = pytest.mark.engine

SMALL = ["--dtype", "float32", "--max-length", "256", "--max-prompt-length", "128", "--batch-size", "2",
         "--shard-size", "2"]
PAIRS = 32
RAY = ["--executor", "ray", "--num-actors", "2"]


def _command(model, data, output, *extra):
    return score_command("--model", model, "--dataset", data, "--output", str(output), *SMALL, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-scoring")
    rows = make_pairs(PAIRS)
    rows.insert(5, bad_rows()[0])
    rows.insert(25, bad_rows()[5])
    return root, write_jsonl(root / "pairs.jsonl", rows)


def _assert_same_rows(output, reference) -> None:
    """Ids, token ids and texts equal, every float column within float32 rounding of another batching."""
    rows, expected = read_shard_rows(output), read_shard_rows(reference)
    assert [r["id"] for r in rows] == [r["id"] for r in expected] and len(rows) == PAIRS
    for row, other in zip(rows, expected):
        assert row.keys() == other.keys()
        for column, value in row.items():
            if isinstance(value, list) and value and isinstance(value[0], float):
                np.testing.assert_allclose(value, other[column], atol=1e-5, err_msg=column)
            else:
                assert value == other[column], column


def _counts(output) -> dict:
    return json.loads((output / "manifest.json").read_text())["counts"]


def test_vllm_actors_write_the_rows_of_one_local_worker(tiny_model, data):
    root, pairs = data
    local = run(_command(tiny_model, pairs, root / "vllm-local", "--enforce-eager"))
    assert local.returncode == 0, local.stderr[-3000:]
    result = _run_alone(_command(tiny_model, pairs, root / "vllm-ray", "--enforce-eager", *RAY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pairs scored   {PAIRS}" in result.stdout and "pairs skipped  2" in result.stdout
    assert "(vllm:cached_prefix_rows)" in result.stdout
    shards = sorted(p.name for p in (root / "vllm-ray" / "data").glob("*.parquet"))
    assert any("-00000-of-00002-" in s for s in shards) and any("-00001-of-00002-" in s for s in shards)
    _assert_same_rows(root / "vllm-ray", root / "vllm-local")
    assert _counts(root / "vllm-ray") == _counts(root / "vllm-local")
    record = json.loads((root / "vllm-ray" / ".treg-ray.json").read_text())
    assert record["num_actors"] == 2 and record["num_workers"] == 2 and record["ray_address"] is None
    assert record["argv"][1:] == [str(a) for a in _command(tiny_model, pairs, root / "vllm-ray", "--enforce-eager",
                                                           *RAY)[3:]]


def test_a_killed_ray_run_continues_to_the_rows_of_one_local_worker(tiny_model, data):
    root, pairs = data
    local = run(_command(tiny_model, pairs, root / "hf-local", "--backend", "hf"))
    assert local.returncode == 0, local.stderr[-3000:]
    output = root / "hf-ray"
    command = [str(a) for a in _command(tiny_model, pairs, output, "--backend", "hf", *RAY)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((output / "data").glob("*.parquet")):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    _kill_run(process)
    assert not (output / "manifest.json").exists()

    rerun = _run_alone(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"pairs scored   {PAIRS}" in rerun.stdout and "(manifest: manifest.json)" in rerun.stdout
    _assert_same_rows(output, root / "hf-local")
    assert _counts(output) == _counts(root / "hf-local")


def _run_alone(command: list) -> subprocess.CompletedProcess:
    """The command in a session of its own: once it has ended, no process of it (Ray's, the engines') is left."""
    process = subprocess.Popen([str(a) for a in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stdout, stderr = process.communicate(timeout=600)
    deadline = time.time() + 30  # Ray's own processes end a moment after the driver
    while _left(process.pid) and time.time() < deadline:
        time.sleep(0.5)
    left = [" ".join(p.cmdline()[:3]) for p in _left(process.pid)]
    _kill_run(process)
    assert not left, left
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _left(session: int) -> list:
    return [p for p in psutil.process_iter() if _of_session(p, session) and p.status() != psutil.STATUS_ZOMBIE]


def _kill_run(process: subprocess.Popen) -> None:
    """SIGKILL the run's process group, and every Ray process it started wherever it is now."""
    started = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has ended
        pass
    process.wait()
    for child in started + [p for p in psutil.process_iter() if _of_session(p, process.pid)]:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=30)


def _of_session(proc: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(proc.pid) == session and proc.pid != session
    except (ProcessLookupError, PermissionError):
        return False


@pytest.mark.parametrize("settings, expected", [
    ({"executor": "ray", "data_parallel_size": 2}, "--num-actors 2 instead of --data-parallel-size 2"),
    ({"executor": "ray", "num_workers": 4, "worker_index": 1}, "leave out --worker-index"),
    ({"num_actors": 2}, "--num-actors is a setting of --executor ray"),
    ({"ray_address": "auto"}, "--ray-address is a setting of --executor ray"),
    ({"executor": "spark"}, "--executor must be one of local, ray"),
])
def test_settings_that_do_not_go_with_the_executor_are_refused(settings, expected):
    with pytest.raises(UserError, match=expected):
        validate(ScoreConfig(dataset="d.jsonl", model="m", output="o", **settings))


def test_a_missing_ray_names_the_extra(monkeypatch):
    from treg_data import ray_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UserError, match=r"pip install 'treg\[ray\]'"):
        ray_executor._import_ray()


def test_an_error_in_an_actor_is_one_line_naming_its_part(tmp_path):
    """What an actor sends back for a part that cannot be scored (here: its model is missing)."""
    from treg_data.ray_executor import ScorerActor

    actor = object.__new__(ScorerActor)  # the actor's state without a Ray cluster
    actor.config, actor.parts, actor.slot = ScoreConfig(dataset="d.jsonl", model=str(tmp_path / "missing"),
                                                        output=str(tmp_path / "out"), num_workers=3), None, 0
    result = actor({"part": np.array([2])})
    error = json.loads(result["result"][0])["error"]
    assert error.startswith("part 2 of 3: ") and "does not exist" in error and "\n" not in error
    assert not (tmp_path / "out").exists()
