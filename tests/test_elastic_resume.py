"""--resume on another number of processes than wrote the checkpoint (2 -> 1 and 1 -> 2: the weights and the
optimizer state are resharded, the global batches are the same), and a run of two torchrun agents started apart,
as on two nodes, on this machine (a c10d rendezvous): train, save, resume."""

import json
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import read_metrics, run, train_command

ARGS = ["--global-batch-size", "8", "--max-steps", "4", "--save-steps", "2", "--learning-rate", "2e-4", "--beta",
        "0.1", "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3"]
RESEEDED = "re-seeded from --seed, the step and its rank"


def _train(model, data, output, *extra, processes=1):
    return run(train_command("--model", model, "--data", data, "--output", output, *ARGS, *extra,
                             processes=processes), timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, learnable_shards, tmp_path_factory):
    """Runs of 4 steps, each saving a checkpoint at step 2, by number of processes: one process, and two under two
    torchrun agents as on two nodes."""
    root = tmp_path_factory.mktemp("elastic")
    result = _train(tiny_model, learnable_shards, root / "on-1")
    assert result.returncode == 0, result.stderr[-3000:]
    for agent in _two_agents(tiny_model, learnable_shards, root / "on-2"):
        assert agent.returncode == 0, agent.stderr[-3000:]
    return {1: root / "on-1", 2: root / "on-2"}


def _stopped_at_first_checkpoint(run_folder: Path, destination: Path) -> Path:
    """A copy of a finished run as if it had been killed after its checkpoint at step 2: no final model yet (the
    metrics it logged past the checkpoint are dropped by --resume, as a killed run's are)."""
    shutil.copytree(run_folder, destination)
    shutil.rmtree(destination / "final")
    (destination / "finished.json").unlink()
    return destination


def _assert_same_losses(resumed: list[dict], uninterrupted: list[dict]) -> None:
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]


@pytest.mark.slow
@pytest.mark.parametrize("written_by, resumed_on", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes_trains_the_same_steps(tiny_model, learnable_shards, uninterrupted,
                                                                      tmp_path, written_by, resumed_on):
    original = uninterrupted[written_by]
    stopped = _stopped_at_first_checkpoint(original, tmp_path / "stopped")
    trainer_state = stopped / "checkpoints" / "step-00000002" / "trainer_state.json"
    recorded = json.loads(trainer_state.read_text())
    assert recorded["world_size"] == written_by
    if written_by == 1:  # as older checkpoints were written: the world size is then their number of RNG files
        del recorded["world_size"]
        trainer_state.write_text(json.dumps(recorded))
    result = _train(tiny_model, learnable_shards, stopped, "--resume", processes=resumed_on)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert (f"the run resumes on {resumed_on} process(es) where it was written by {written_by}" in result.stderr
            and RESEEDED in result.stderr)
    # Step 3 is the global batch after the checkpoint's (the position follows from the step); step 4's loss also
    # needs step 3's update from the resharded optimizer state (Adam's moments) to match.
    _assert_same_losses(read_metrics(stopped), read_metrics(original))
    assert (stopped / "final" / "model.safetensors").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_agents(model, data, output, *extra) -> list[subprocess.CompletedProcess]:
    """treg-train under two torchrun agents of one process each, started apart as on two nodes, meeting at a c10d
    rendezvous on this machine; returns each agent's outcome."""
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", uuid.uuid4().hex]
    command = ["-m", "treg_train", "--model", model, "--data", data, "--output", output, *ARGS, *extra]
    # --node-rank is what a user gives on each node; the c10d rendezvous ranks the agents as they join.
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "--node-rank", str(node),
                                "--rdzv-conf", f"is_host={int(node == 0)}", *map(str, command)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in (0, 1)]
    outcomes = []
    for agent in agents:
        try:
            stdout, stderr = agent.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            raise
        outcomes.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return outcomes


@pytest.mark.slow
def test_two_agents_as_two_nodes_train_save_and_resume(tiny_model, learnable_shards, uninterrupted, tmp_path):
    original = uninterrupted[2]  # both agents exited 0
    assert (original / "checkpoints" / "step-00000002").is_dir() and (original / "final").is_dir()
    _assert_same_losses(read_metrics(original), read_metrics(uninterrupted[1]))  # as one process, step for step
    stopped = _stopped_at_first_checkpoint(original, tmp_path / "stopped")
    resumed = _two_agents(tiny_model, learnable_shards, stopped, "--resume")  # the same way again
    for agent in resumed:
        assert agent.returncode == 0, agent.stderr[-3000:]
    assert "resumed from" in resumed[0].stderr + resumed[1].stderr
    assert not any(RESEEDED in agent.stderr for agent in resumed)  # as many processes: each one's own state
    before, after = read_metrics(original), read_metrics(stopped)
    assert after[:2] == before[:2]  # the lines up to the checkpoint are kept as they were
    _assert_same_losses(after, before)
    assert (stopped / "final" / "model.safetensors").is_file()
