"""One run per folder, held by a lock that a killed run does not leave behind; a start that failed before its
first checkpoint can be run again; what can be checked is checked before a folder is claimed."""

import json
import subprocess
import sys
import time

import pytest
from helpers import assert_one_line_error, hf_score_config, make_pairs, read_metrics, run, train_command, write_jsonl

TRAIN = ["--global-batch-size", "8", "--logging-steps", "1", "--save-steps", "0"]


def _hold_lock(folder, command: str, name: str = "") -> subprocess.Popen:
    """Another process holding the folder's lock, as a running treg command does."""
    code = (f"import sys, time; from treg_core.folders import lock_folder; lock_folder({str(folder)!r}, {command!r}, "
            f"{name!r}); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_second_training_run_into_a_folder_in_use_is_refused_and_a_killed_one_leaves_no_lock(
        tiny_model, learnable_shards, tmp_path):
    folder = tmp_path / "run"
    holder = _hold_lock(folder, "treg-train")
    try:
        result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder,
                                   "--max-steps", "1", *TRAIN))
        assert_one_line_error(result, f"{folder} is in use by treg-train (pid {holder.pid}")
        assert not (folder / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder,
                               "--max-steps", "1", *TRAIN))
    assert result.returncode == 0, result.stderr[-2000:]


def _claim_all(folders: list[str]) -> list[str]:
    """claim_folder on each folder in turn; the errors, as text."""
    from treg_core.errors import UserError
    from treg_core.folders import claim_folder

    errors = []
    for folder in folders:
        try:
            claim_folder(folder, "treg-score")
        except UserError as err:
            errors.append(str(err))
    return errors


def test_workers_started_together_all_claim_the_new_folder(tmp_path):
    """The workers of one treg-score run (--data-parallel-size, or --worker-index launched together) claim one
    new folder at the same moment: none may take the others' marker for a stranger's file."""
    from concurrent.futures import ProcessPoolExecutor

    folders = [str(tmp_path / f"out-{i}") for i in range(300)]
    with ProcessPoolExecutor(4) as pool:
        errors = [e for found in pool.map(_claim_all, [folders] * 4) for e in found]
    assert not errors, errors[:3]


def test_a_second_scoring_run_of_the_same_worker_is_refused(tiny_model, tmp_path):
    import pytest

    from treg_core.errors import UserError
    from treg_data import pipeline

    data, folder = write_jsonl(tmp_path / "d.jsonl", make_pairs(4)), tmp_path / "scored"
    holder = _hold_lock(folder, "treg-score", "-train-00000-of-00002")
    try:
        with pytest.raises(UserError, match=f"is in use by treg-score \\(pid {holder.pid}"):
            pipeline.run(hf_score_config(tiny_model, data, folder, num_workers=2, worker_index=0))
        pipeline.run(hf_score_config(tiny_model, data, folder, num_workers=2, worker_index=1))  # another worker
    finally:
        holder.kill()
        holder.wait()
    summary = pipeline.run(hf_score_config(tiny_model, data, folder, num_workers=2, worker_index=0))
    assert summary.manifest is not None  # both workers finished: the folder is complete


def _settings(**changed) -> dict:
    """A scoring run's recorded settings, two workers unless `changed` (no model runs: the folder's lock and its
    checks read nothing else)."""
    return {"model": "m", "model_revision": None, "scorer_model": "m", "dpo_model": None, "reverse_dpo_model": None,
            "ref_topk": 0, "ce_scores": False, "tokenizer_hash": "t", "dataset": "d.jsonl",
            "dataset_config": None, "input_fingerprint": "f", "split": "train", "columns": {},
            "token_rewards": "contrastive",
            "revision_prompts": {}, "reward_transform": "r", "max_length": 256, "max_prompt_length": 128,
            "max_model_len": 1024, "backend": "hf", "dtype": "float32", "num_workers": 2, "shard_size": 8,
            "treg_version": "0", **changed}


def _store(folder, settings: dict, worker: int):
    """treg-score's store of one worker of the run `settings` describes."""
    from treg_core.contract import Provenance
    from treg_data.shards import ShardStore

    return ShardStore(folder, "train", worker, settings["num_workers"], Provenance.from_dict(settings, "test"))


def _start_worker(folder, settings: dict, worker: int, overwrite: bool = False) -> subprocess.Popen:
    """Another process scoring as worker `worker` of the run `settings` describes: it holds the folder as treg-score
    does, and has written its first shard."""
    code = ("import json, time; from treg_core.contract import Provenance, ShardInfo; "
            "from treg_data.shards import ShardStore; "
            f"settings = json.loads({json.dumps(settings)!r}); "
            f"store = ShardStore({str(folder)!r}, 'train', {worker}, settings['num_workers'], "
            "Provenance.from_dict(settings, 'test')); "
            f"store.resume(0, {overwrite}); store.write_shard(0, [], ShardInfo(0, 0, 0, 0, [])); "
            "print('held', flush=True); time.sleep(120)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _holds(worker: subprocess.Popen) -> bool:
    return worker.stdout.readline().strip() == "held"


def test_the_workers_of_one_run_share_the_folder_and_no_other_run_may_write_or_clear_it(tmp_path):
    """Workers of one run (--data-parallel-size 2 --overwrite: both at once) hold the folder together; while they
    do, a worker of another --num-workers or other settings is refused, and so is an --overwrite, which would
    otherwise clear the shards they are writing. Once they are killed, nothing of their lock is left."""
    import pytest

    from treg_core.errors import UserError

    folder = tmp_path / "scored"
    workers = [_start_worker(folder, _settings(), worker, overwrite=True) for worker in (0, 1)]
    try:
        assert all(_holds(worker) for worker in workers)
        shards = sorted((folder / "data").glob("*.parquet"))
        assert [p.name[:len("train-00000-of-00002")] for p in shards] == ["train-00000-of-00002",
                                                                           "train-00001-of-00002"]
        for settings, overwrite, differ in ((_settings(num_workers=1), False, "num_workers differ"),
                                            (_settings(num_workers=1), True, "num_workers differ"),
                                            (_settings(max_length=512), True, "max_length differ")):
            first = "|".join(str(worker.pid) for worker in workers)  # whichever took the folder first
            with pytest.raises(UserError, match=f"is in use by treg-score \\(pid ({first}) .*\\), a run with other "
                                                f"settings \\({differ}\\); wait for it to end"):
                _store(folder, settings, 0).resume(0, overwrite)
            assert sorted((folder / "data").glob("*.parquet")) == shards
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    _store(folder, _settings(num_workers=1), 0).resume(0, overwrite=True)
    assert not list((folder / "data").glob("*.parquet"))  # the other run's shards, replaced as asked


@pytest.mark.slow
def test_a_start_that_failed_before_its_first_checkpoint_can_be_run_again(tiny_model, learnable_shards, tmp_path):
    folder = tmp_path / "run"
    failed = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder,
                               "--max-steps", "2", "--learning-rate", "1e9", "--warmup-ratio", "0", *TRAIN))
    assert_one_line_error(failed, "not finite")
    resumed = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder,
                                "--max-steps", "2", "--resume", *TRAIN))
    assert_one_line_error(resumed, "no complete checkpoint", "without --resume to start again")
    again = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder,
                              "--max-steps", "2", *TRAIN))
    assert again.returncode == 0, again.stderr[-2000:]
    assert [m["step"] for m in read_metrics(folder)] == [1, 2]  # this run's lines only
    done = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder,
                             "--max-steps", "2", *TRAIN))
    assert_one_line_error(done, "already holds a run")  # a finished run is never started over


def test_a_missing_reporting_package_is_found_before_the_folder_is_claimed(tiny_model, learnable_shards, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        import pytest

        pytest.skip("tensorboard is installed here")
    started = time.perf_counter()
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--report-to", "tensorboard", *TRAIN))
    assert_one_line_error(result, "--report-to tensorboard needs the tensorboard package")
    assert not (tmp_path / "run").exists() and time.perf_counter() - started < 120


# ---- every model that meets the shards is checked against them ------------------------------------------------


@pytest.mark.slow
def test_models_that_do_not_match_the_shards_are_refused_or_named(tiny_model, learnable_shards, tmp_path):
    from helpers import perturbed_copy
    from tiny_model import build_tiny_model

    other = str(build_tiny_model(tmp_path / "other-vocabulary", vocab_size=600))
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "ref",
                               "--ref-model", other, "--max-steps", "1", *TRAIN))
    assert_one_line_error(result, f"--ref-model {other} has a different vocabulary")
    result = run([sys.executable, "-m", "treg_data.inspect_cli", learnable_shards, "--checkpoint", other,
                  "--output", str(tmp_path / "page.html")])
    assert_one_line_error(result, f"--checkpoint {other} has a different vocabulary")
    sibling = perturbed_copy(tiny_model, tmp_path / "sibling", seed=5)  # same tokenizer, other weights
    result = run(train_command("--model", sibling, "--data", learnable_shards, "--output", tmp_path / "sibling-run",
                               "--max-steps", "1", *TRAIN))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"were scored with {tiny_model}, not with --model {sibling}" in result.stderr
    assert "first loss is not ln 2" in result.stderr


def test_an_attention_that_cannot_run_is_one_line_before_the_folder_is_claimed(tiny_model, learnable_shards,
                                                                              tmp_path):
    import importlib.util

    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "a",
                               "--attn-implementation", "foo", *TRAIN))
    assert_one_line_error(result, "--attn-implementation foo is not one treg can run")
    if importlib.util.find_spec("flash_attn") is None:
        result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "b",
                                   "--attn-implementation", "flash_attention_2", *TRAIN))
        import torch

        assert_one_line_error(result, "needs the flash_attn package" if torch.cuda.is_available() else "needs a GPU")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_the_training_pairs_as_eval_data_and_an_unfinished_folder_are_named(tiny_model, learnable_shards, tmp_path):
    import shutil

    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--eval-data", learnable_shards, "--max-steps", "1", *TRAIN))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--eval-data is --data's own shards" in result.stderr
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "held",
                               "--eval-fraction", "0.95", *TRAIN))
    assert_one_line_error(result, "training pairs give no step of --global-batch-size 8 (--eval-fraction 0.95 "
                                  "holds out")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(learnable_shards, unfinished)
    (unfinished / "manifest.json").unlink()
    result = run([sys.executable, "-m", "treg_data.inspect_cli", str(unfinished), "--random", "1"])
    assert result.returncode == 0 and "is not finished (no manifest.json)" in result.stderr


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_or_the_export_is_one_line_and_leaves_nothing_partial(
        tiny_model, learnable_shards, tmp_path):
    """A file-size limit makes every large write fail as a full disk would (EFBIG instead of ENOSPC)."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    for name, save_steps, what in (("ckpt", "1", "cannot write the checkpoint of step 1"),
                                   ("export", "0", "cannot write the final model")):
        folder = tmp_path / name
        args = train_command("--model", tiny_model, "--data", learnable_shards, "--output", folder, "--max-steps",
                             "2", "--global-batch-size", "8", "--save-steps", save_steps)
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                                preexec_fn=limited)
        # No checkpoint was written before, so the advice is the command that works: the same one, not --resume.
        assert_one_line_error(result, what, "nothing partial was kept", "rerun the same command (without --resume")
        assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
        assert not (folder / "final").exists() and not list(folder.glob("checkpoints/step-*"))
