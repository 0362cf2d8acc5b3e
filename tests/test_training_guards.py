"""A run that cannot have trained what it says stops before it exports: every pair without a gradient, weights
blown up though finite. What a run does that the user may not expect is said at its start: pairs carried over
from one epoch to the next, a finished run continued. After a stop, the advice is a command that works."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    hf_score_config,
    perturbed_copy,
    read_metrics,
    run,
    train_command,
    write_jsonl,
)

from treg_data import pipeline

TRAIN = ["--global-batch-size", "8", "--logging-steps", "1", "--save-steps", "0", "--seed", "3"]


def _train(model, data, output, *extra):
    return run(train_command("--model", model, "--data", data, "--output", output, *TRAIN, *extra), timeout=600)


@pytest.fixture(scope="module")
def short_rejected(tiny_model, tmp_path_factory):
    """16 pairs scored with a --dpo-model whose rejected answers are one word, and 16 whose answers are long."""
    root = tmp_path_factory.mktemp("sepo")
    dpo = perturbed_copy(tiny_model, root / "dpo", seed=1)
    folders = {}
    for name, rejected in (("short", "No."), ("long", "No, the answer is another number, {i} less than that.")):
        rows = [{"id": f"{name}-{i}", "prompt": f"What is {i} plus {i}?",
                 "chosen": f"The sum of {i} and {i} is {2 * i}, as adding a number to itself doubles it.",
                 "rejected": rejected.format(i=i)} for i in range(16)]
        data = write_jsonl(root / f"{name}.jsonl", rows)
        pipeline.run(hf_score_config(tiny_model, data, root / name, dpo_model=dpo))
        folders[name] = root / name
    return folders


@pytest.mark.slow
def test_a_run_in_which_no_pair_has_a_gradient_stops_naming_the_setting(tiny_model, short_rejected, tmp_path):
    # SePO keeps ⌊0.3·(L − 1)⌋ tokens of an answer: none of a rejected answer of 2 or 3 tokens.
    result = _train(tiny_model, short_rejected["short"], tmp_path / "short", "--loss", "sepo", "--max-steps", "2")
    assert_one_line_error(result, "no pair of global batch 1 gives the loss anything to learn", "--sepo-ratio",
                          "none below 5 tokens")
    assert not (tmp_path / "short" / "final").exists()
    result = _train(tiny_model, short_rejected["short"], tmp_path / "ratio", "--loss", "sepo", "--max-steps", "2",
                    "--sepo-ratio", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    # Counted at each log line: the share of the pairs without a gradient.
    assert [line["skipped_zero_weights"] for line in read_metrics(tmp_path / "ratio")] == [0.0, 0.0]
    result = _train(tiny_model, short_rejected["long"], tmp_path / "long", "--loss", "sepo", "--max-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path / "long")[0]["skipped_zero_weights"] == 0.0


def test_weights_blown_up_but_finite_are_not_exported(tiny_model, learnable_shards, tmp_path):
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--max-steps", "1", "--learning-rate", "1e8",
                    "--global-batch-size", "10")
    assert_one_line_error(result, "the weights after the update at step 1 have blown up", "more than 10x",
                          "nothing was exported", "lower --learning-rate")
    assert not (tmp_path / "run" / "final").exists()
    # 96 pairs in batches of 10: said at the start, and none dropped.
    assert "the 6 left over at the end of an epoch open the next epoch's first batch" in result.stderr


def test_a_busy_output_folder_is_refused_before_the_model_loads(tiny_model, learnable_shards, tmp_path):
    weightless = tmp_path / "model"
    shutil.copytree(tiny_model, weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    folder = tmp_path / "run"
    code = (f"import time; from treg_core.folders import lock_folder; lock_folder({str(folder)!r}, 'treg-train'); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _train(str(weightless), learnable_shards, folder, "--max-steps", "1")
        assert_one_line_error(result, f"{folder} is in use by treg-train (pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_advises_a_command_that_works(tiny_model, learnable_shards, tmp_path):
    folder = tmp_path / "run"
    args = train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder, *TRAIN,
                         "--max-steps", "1000", "--save-steps", "500")
    # As from a terminal: a test run started in the background (`cmd &` in a script) passes SIGINT on ignored.
    process = subprocess.Popen([str(a) for a in args], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("treg-train: 1 process(es)"):
            process.send_signal(signal.SIGINT)
            break
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 130, "".join(lines)[-3000:]
    assert lines[-1].startswith("treg-train: interrupted; rerun the same command (without --resume"), lines[-3:]
    result = _train(tiny_model, learnable_shards, folder, "--max-steps", "1")  # which is accepted
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_continuing_a_finished_run_says_so_and_keeps_its_model(tiny_model, learnable_shards, tmp_path):
    folder = tmp_path / "run"
    result = _train(tiny_model, learnable_shards, folder, "--max-steps", "3", "--save-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    finished = {p.name: p.read_bytes() for p in (folder / "final").iterdir()}
    result = _train(tiny_model, learnable_shards, folder, "--max-steps", "4", "--save-steps", "2", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("the run finished at step 3; it goes on from its newest checkpoint, step 2: step 3 is trained again, "
            "to step 4 under the new schedule" in result.stderr)
    assert f"its model of step 3 moves to {folder / 'final-step-3'}" in result.stderr
    assert {p.name: p.read_bytes() for p in (folder / "final-step-3").iterdir()} == finished
    assert json.loads((folder / "finished.json").read_text()) == {"step": 4}
    assert (Path(folder) / "final" / "config.json").is_file()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost raise, as Python reports it
def test_a_ctrl_c_lost_in_a_finaliser_still_stops_the_run():
    """Python drops a KeyboardInterrupt raised while a __del__ runs; the steps check the flag the handler keeps."""
    import gc
    import os

    from treg_core import errors

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # delivered while the finaliser runs: its raise is lost

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as from a terminal
        errors.watch_ctrl_c()
        Finalised()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            errors.check_interrupted()
    finally:
        signal.signal(signal.SIGINT, before)
        errors._CtrlC.seen = False


def test_ctrl_c_during_a_checkpoint_write_is_not_a_full_disk():
    from torch.distributed.checkpoint.api import CheckpointException

    from treg_train.checkpoint import _interrupted

    assert _interrupted(CheckpointException("save", {1: (KeyboardInterrupt(), None)}))
    assert not _interrupted(CheckpointException("save", {0: (OSError(28, "No space left on device"), None)}))


def test_a_finished_run_without_checkpoints_advises_a_new_output(tiny_model, learnable_shards, tmp_path):
    folder = tmp_path / "run"
    result = _train(tiny_model, learnable_shards, folder, "--max-steps", "1")  # --save-steps 0: no checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    advice = f"without a checkpoint to go on from (--save-steps); its model is {folder / 'final'}: give a new --output"
    assert_one_line_error(_train(tiny_model, learnable_shards, folder, "--max-steps", "2", "--resume"), advice)
    assert_one_line_error(_train(tiny_model, learnable_shards, folder, "--max-steps", "2"), advice)
