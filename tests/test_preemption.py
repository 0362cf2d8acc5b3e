"""Preemption and lost processes, for real: torchrun with 2 processes on CPU (gloo). A stop signal makes the run
save a checkpoint at the next step boundary and exit 75, and --resume finishes the same model as a run never
stopped; a process that dies makes the others exit with one line instead of hanging."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import read_metrics, run, train_command

from treg_core.command_line import load_settings
from treg_core.errors import UserError
from treg_train.config import TrainConfig, validate
from treg_train.stopping import STOPPED, StopSignals

ARGS = ["--global-batch-size", "8", "--max-steps", "6", "--learning-rate", "2e-4", "--beta", "0.1",
        "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3",
        "--save-steps", "0"]
SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "launch" / "train_1node.sh"
STOP_LINE = re.compile(r"treg-train: stopped by SIGUSR1 at step (\d+) with a checkpoint in (\S+); rerun with "
                       r"--resume to continue")


def _metric_lines(output: Path) -> int:
    metrics = output / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def _wait_for_steps(process: subprocess.Popen, output: Path, steps: int) -> None:
    deadline = time.time() + 300
    while _metric_lines(output) < steps:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.02)


def _launch_script(config: Path, output: Path, log: Path) -> subprocess.Popen:
    """pipelines/launch/train_1node.sh on 2 processes, its output in `log`."""
    env = {**os.environ, "GPUS_PER_NODE": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(log, "w") as handle:
        return subprocess.Popen(["bash", SCRIPT, config, output, *ARGS], stdout=handle, stderr=subprocess.STDOUT,
                                env=env)


def _finish(process: subprocess.Popen, log: Path) -> str:
    process.wait(timeout=300)
    return log.read_text()


@pytest.mark.slow
def test_a_stop_signal_saves_exits_75_and_resume_finishes_the_same_model(tiny_model, learnable_shards, tmp_path):
    from safetensors.torch import load_file

    config, output = tmp_path / "run.yaml", tmp_path / "stopped"
    config.write_text(yaml.safe_dump({"model": tiny_model, "data": learnable_shards}))
    process = _launch_script(config, output, tmp_path / "first.log")
    _wait_for_steps(process, output, 2)
    # As Slurm's --signal: every process of the job step, torchrun's agent too (the script makes it ignore it).
    for proc in [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True):
        proc.send_signal(signal.SIGUSR1)
    log = _finish(process, tmp_path / "first.log")
    assert process.returncode == 1, log[-3000:]  # torchrun's own code for any failed rank; it outlived SIGUSR1
    assert len(re.findall(r"exitcode\s+: 75 ", log)) == 2, log[-3000:]  # each rank's, as torchrun saw it
    stops = STOP_LINE.findall(log)
    assert len(stops) == 1 and not re.search(r'File ".*/treg_', log), log[-3000:]  # torchrun's traceback only
    step, checkpoint = int(stops[0][0]), Path(stops[0][1])
    assert 2 <= step < 6 and checkpoint == output / "checkpoints" / f"step-{step:08d}" and checkpoint.is_dir()
    assert yaml.safe_load((output / STOPPED).read_text()) == {"signal": "SIGUSR1", "step": step,
                                                             "checkpoint": str(checkpoint)}
    assert _metric_lines(output) == step and not (output / "final").exists()

    process = _launch_script(config, output, tmp_path / "second.log")  # the script resumes: checkpoints/ exists
    log = _finish(process, tmp_path / "second.log")
    assert process.returncode == 0, log[-3000:]
    assert f"resumed from {checkpoint}" in log and not (output / STOPPED).exists()

    uninterrupted = tmp_path / "uninterrupted"
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", uninterrupted, *ARGS,
                               processes=2))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, whole = read_metrics(output), read_metrics(uninterrupted)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert resumed[-1]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-5)
    weights, reference = (load_file(folder / "final" / "model.safetensors") for folder in (output, uninterrupted))
    assert weights.keys() == reference.keys()
    assert max((weights[name] - reference[name]).abs().max().item() for name in weights) <= 1e-5


def test_a_process_that_dies_ends_the_others_with_one_line(tiny_model, learnable_shards, tmp_path):
    """Two plain processes, no torchrun agent (it would kill the other rank itself): rank 1 is killed after its
    first step, and rank 0 must say so and exit, within the collective timeout."""
    output = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [str(a) for a in train_command("--model", tiny_model, "--data", learnable_shards, "--output", output,
                                             *ARGS, "--max-steps", "40", "--collective-timeout", "1")]
    ranks = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in (0, 1)]
    try:
        _wait_for_steps(ranks[0], output, 1)  # rank 0 logs step 1 once both ranks reduced its metrics
        ranks[1].kill()
        killed = time.time()
        _, stderr = ranks[0].communicate(timeout=90)  # the timeout (60 s) and a margin: never a hang
    finally:
        for rank in ranks:
            rank.kill()
    assert time.time() - killed < 75
    assert ranks[0].returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    assert re.search(r"treg-train: error: another process of the run stopped or stopped answering during step \d+ "
                     r"\(.*(Connection (reset|closed) by peer|Timed out).*\); rerun the same command", errors[0]), \
        errors[0]


# ---- the settings ---------------------------------------------------------------------------


def _config(**settings) -> TrainConfig:
    return validate(load_settings(TrainConfig, None, {"model": "m", "data": "d", "output": "o", **settings}))


@pytest.mark.parametrize("value, message", [
    ("SIGTERM,SIGFOO", "--stop-signals names SIGFOO, which is not a signal"),
    ("SIGKILL", "--stop-signals names SIGKILL, which no process can catch"),
    ("SIGINT", "--stop-signals names SIGINT: Ctrl-C stops a run already"),
])
def test_a_stop_signal_that_cannot_stop_a_run_is_refused(value, message):
    with pytest.raises(UserError, match=message):
        _config(stop_signals=value)


def test_stop_signals_may_be_spelled_short_or_be_none():
    assert [s.name for s in StopSignals(_config(stop_signals="usr1, SIGTERM").stop_signals).signals] == \
        ["SIGUSR1", "SIGTERM"]
    assert StopSignals(_config(stop_signals="").stop_signals).signals == []


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_a_collective_timeout_that_is_not_positive_is_refused(value):
    with pytest.raises(UserError, match=f"--collective-timeout {value!r}: it must be a positive number of minutes"):
        _config(collective_timeout=value)


def test_a_stop_signal_is_only_recorded_and_the_handler_given_back():
    before = signal.getsignal(signal.SIGUSR2)
    with StopSignals("SIGUSR2") as stop:
        os.kill(os.getpid(), signal.SIGUSR2)  # no raise: the loop reads it at its next step boundary
        assert stop.received == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before
