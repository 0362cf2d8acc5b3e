"""pipelines/launch/train_ray.py for real: treg-train inside Ray Train's TorchTrainer, 2 workers on a local Ray
cluster on the CPU (gloo), against torchrun with 2 processes on the same data and settings."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from helpers import read_metrics, run, train_command

LAUNCHER = Path(__file__).resolve().parents[1] / "pipelines" / "launch" / "train_ray.py"
ARGS = ["--global-batch-size", "8", "--max-steps", "4", "--save-steps", "2", "--learning-rate", "2e-4", "--beta",
        "0.1", "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3"]


def ray_processes(folder: str) -> list[psutil.Process]:
    """The processes of the Ray cluster whose temporary folder is `folder`: all of them inherit RAY_TMPDIR (a worker's
    command line is only its title, ray::RayTrainWorker)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAY_TMPDIR") == folder:
                found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    return found


def launch(cwd: Path, *flags) -> subprocess.CompletedProcess:
    """The launcher with 2 workers, on a Ray cluster of its own: it starts one in a temporary folder of this test
    (short, for Ray's socket paths), which no other cluster on the machine shares, and must end it with the command."""
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_TMPDIR": folder}
    try:
        result = subprocess.run([sys.executable, LAUNCHER, "--num-workers", "2", "--storage-path", "ray-storage", "--",
                                 *map(str, flags)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        deadline = time.time() + 30
        while ray_processes(folder) and time.time() < deadline:
            time.sleep(0.5)
        left = ray_processes(folder)
        assert not left, f"Ray processes outlived the launcher: {[p.name() for p in left]}"
    finally:
        for process in ray_processes(folder):
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)
    return result


@pytest.fixture(scope="module")
def torchrun_run(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("torchrun") / "run"
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", output, *ARGS,
                               processes=2))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def ray_run(tiny_model, learnable_shards, tmp_path_factory):
    """Given paths relative to the folder it starts in: Ray Train's workers run in a folder of Ray's."""
    root = tmp_path_factory.mktemp("ray")
    flags = ["--model", os.path.relpath(tiny_model, root), "--data", os.path.relpath(learnable_shards, root),
             "--output", "run", *ARGS]
    return root, flags, launch(root, *flags)


@pytest.mark.slow
def test_ray_train_finishes_with_the_losses_of_torchrun(ray_run, torchrun_run):
    root, _, result = ray_run
    assert result.returncode == 0, result.stderr[-5000:]
    assert "treg-train: 2 process(es) on cpu" in result.stderr
    output = root / "run"
    assert json.loads((output / "finished.json").read_text()) == {"step": 4}
    assert (output / "final" / "config.json").is_file() and (output / "final" / "model.safetensors").is_file()
    assert (output / "checkpoints" / "step-00000002").is_dir()  # treg's own checkpoints, not Ray's
    assert [p.name for p in (root / "ray-storage").rglob("*") if p.is_file()] == [".validate_storage_marker"]
    ray, torchrun = read_metrics(output), read_metrics(torchrun_run)
    assert [m["step"] for m in ray] == [1, 2, 3, 4]
    for a, b in zip(torchrun, ray, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.slow
def test_a_treg_error_of_the_workers_is_one_line(ray_run):
    """--resume reaches treg-train on the workers, which refuse the finished run: the launcher says it in one line."""
    root, flags, _ = ray_run
    result = launch(root, *flags, "--resume")
    assert result.returncode == 2, result.stderr[-5000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"train_ray.py: error: --resume: the run in {root / 'run'} finished at step 4"), result.stderr[-3000:]
    assert result.stderr.count("nothing to resume") == 1, result.stderr[-5000:]  # no worker's traceback of it
    assert "treg_core" not in result.stderr, result.stderr[-5000:]


def test_a_mistake_costs_no_cluster(tmp_path):
    result = run([sys.executable, LAUNCHER, "--num-workers", "2", "--", "--model", "m", "--data", "d", "--output",
                  tmp_path / "run", "--learning-rate", "-1"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == "train_ray.py: error: --learning-rate -1.0: it must be a positive number", \
        result.stderr
    assert not (tmp_path / "run").exists()
