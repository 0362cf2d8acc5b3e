"""The real vLLM engine (CPU build) through the real command line: parity with the transformers
reference scorer, and resume after SIGKILL mid-run."""

import contextlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import (
    BAD_REASONS,
    bad_rows,
    make_pairs,
    perturbed_copy,
    read_metrics,
    read_shard_rows,
    run,
    score_command,
    train_command,
    write_jsonl,
)

pytestmark = pytest.mark.engine

LOGPS = [f"{side}_{ctx}_logps" for side in ("chosen", "rejected") for ctx in ("ref", "better", "worse")]


def _command(model, data, output, *extra):
    return score_command("--model", model, "--dataset", data, "--output", str(output),
            "--dtype", "float32", "--max-length", "256", "--max-prompt-length", "128", "--enforce-eager", *extra)


@pytest.fixture(scope="module")
def scored(tiny_model, tmp_path_factory):
    """One uninterrupted vLLM run and one reference run over the same input."""
    root = tmp_path_factory.mktemp("engine")
    rows = make_pairs(120)
    for offset, bad in enumerate(bad_rows()):
        rows.insert(5 + 9 * offset, bad)
    data = write_jsonl(root / "pairs.jsonl", rows)
    small = ["--batch-size", "6", "--shard-size", "10"]
    vllm_run = run(_command(tiny_model, data, root / "vllm", *small))
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    hf_run = run(_command(tiny_model, data, root / "hf", "--backend", "hf", *small))
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]
    return dict(root=root, data=data, rows=rows, small=small, vllm=vllm_run, hf=hf_run)


def test_vllm_matches_the_reference_scorer_on_every_token(scored):
    vllm_rows, hf_rows = read_shard_rows(scored["root"] / "vllm"), read_shard_rows(scored["root"] / "hf")
    assert ([r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
            == [r["id"] for r in scored["rows"] if r["id"] not in BAD_REASONS])
    worst = 0.0
    for a, b in zip(vllm_rows, hf_rows):
        for side in ("prompt", "chosen", "rejected"):
            assert a[f"{side}_ids"] == b[f"{side}_ids"]
        for column in LOGPS:
            worst = max(worst, float(np.abs(np.subtract(a[column], b[column])).max()))
    assert worst <= 1e-4, worst


def test_command_line_reports_path_skips_and_summary(scored):
    out, err = scored["vllm"].stdout, scored["vllm"].stderr
    assert "scoring path: vllm:cached_prefix_rows" in err
    assert "skipped bad-missing: missing_field" in err
    assert "Traceback" not in err
    assert "pairs scored   120" in out and "pairs skipped  7" in out and "tokens/s" in out
    manifest = json.loads((scored["root"] / "vllm" / "manifest.json").read_text())
    assert manifest["scoring_path"] == ["vllm:cached_prefix_rows"]
    assert manifest["counts"]["skipped_by_reason"]["too_long"] == 1


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_model, scored):
    output = scored["root"] / "killed"
    args = _command(tiny_model, scored["data"], output, *scored["small"])
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while len(list((output / "data").glob("*.parquet"))) < 3:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the engine's worker processes die too
    process.wait()
    written = len(list((output / "data").glob("*.parquet")))
    assert not (output / "manifest.json").exists() and written < 12

    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming after" in rerun.stderr
    assert read_shard_rows(output) == read_shard_rows(scored["root"] / "vllm")
    counts = lambda path: json.loads((path / "manifest.json").read_text())["counts"]  # noqa: E731
    assert counts(output) == counts(scored["root"] / "vllm")


def test_strict_stops_at_the_bad_row_with_one_line(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", bad_rows()[3:4] + make_pairs(2))
    result = run(_command(tiny_model, data, tmp_path / "out", "--strict"))
    assert result.returncode == 2
    assert "bad-nonstring" in result.stderr and "non_string_content" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_model_and_dataset_give_one_line(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    for args, expected in [
        (_command(str(tmp_path / "missing-model"), data, tmp_path / "o1"), "does not exist"),
        (_command(tiny_model, "no-such-org/no-such-dataset", tmp_path / "o2"), "cannot load dataset"),
    ]:
        result = run(args)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_two_data_parallel_workers_match_one_row_for_row_at_the_default_dtype(tiny_model, scored):
    """--data-parallel-size 2: two engines, one folder, one merged manifest; --dtype left at auto
    resolves to the checkpoint's float32, so the rows match the fp32 runs."""
    output = scored["root"] / "data-parallel"
    args = _command(tiny_model, scored["data"], output, *scored["small"], "--data-parallel-size", "2")
    del args[args.index("--dtype"):args.index("--dtype") + 2]
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs scored   120" in result.stdout and "pairs skipped  7" in result.stdout
    shards = sorted(p.name for p in (output / "data").glob("*.parquet"))
    assert any("-00000-of-00002-" in s for s in shards) and any("-00001-of-00002-" in s for s in shards)
    manifest = json.loads((output / "manifest.json").read_text())
    one = json.loads((scored["root"] / "vllm" / "manifest.json").read_text())
    assert manifest["provenance"]["dtype"] == "float32"
    assert manifest["counts"] == one["counts"]
    parallel_rows = read_shard_rows(output)
    single_rows, reference_rows = read_shard_rows(scored["root"] / "vllm"), read_shard_rows(scored["root"] / "hf")
    assert [r["id"] for r in parallel_rows] == [r["id"] for r in single_rows]
    worst_vs_single = worst_vs_reference = 0.0
    for a, b, ref in zip(parallel_rows, single_rows, reference_rows):
        assert all(a[f"{side}_ids"] == b[f"{side}_ids"] for side in ("prompt", "chosen", "rejected"))
        for column in LOGPS:
            worst_vs_single = max(worst_vs_single, float(np.abs(np.subtract(a[column], b[column])).max()))
            worst_vs_reference = max(worst_vs_reference, float(np.abs(np.subtract(a[column], ref[column])).max()))
    assert worst_vs_single <= 1e-5, worst_vs_single
    assert worst_vs_reference <= 1e-4, worst_vs_reference


@pytest.fixture(scope="module")
def dpo_scored(tiny_model, tmp_path_factory):
    """A few pairs scored with --dpo-model and --reverse-dpo-model (perturbed copies of the tiny model) by vLLM,
    which then runs three engines, and by the reference scorer."""
    root = tmp_path_factory.mktemp("engine-dpo")
    dpo_model = perturbed_copy(tiny_model, root / "tiny-dpo", seed=1)
    reverse_model = perturbed_copy(tiny_model, root / "tiny-reverse-dpo", seed=2)
    data = write_jsonl(root / "pairs.jsonl", make_pairs(8))
    for name, extra in (("vllm", []), ("hf", ["--backend", "hf"])):
        result = run(_command(tiny_model, data, root / name, "--dpo-model", dpo_model, "--reverse-dpo-model",
                              reverse_model, "--batch-size", "4", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_vllm_dpo_columns_match_the_reference_scorer(dpo_scored):
    vllm_rows, hf_rows = read_shard_rows(dpo_scored / "vllm"), read_shard_rows(dpo_scored / "hf")
    assert len(vllm_rows) == 8 and [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
    worst = largest = 0.0
    for a, b in zip(vllm_rows, hf_rows):
        for column in (f"{side}_{name}" for side in ("chosen", "rejected")
                       for name in ("dpo_rewards", "dpo_logps", "rev_dpo_logps")):
            assert len(a[column]) == len(a[column.split("_")[0] + "_ids"])
            worst = max(worst, float(np.abs(np.subtract(a[column], b[column])).max()))
            largest = max(largest, float(np.abs(a[column]).max()))
    assert worst <= 1e-4, worst
    assert largest > 1e-3, largest


def test_training_reads_the_dpo_rewards_column(tiny_model, dpo_scored, tmp_path):
    result = run(train_command(
        "--model", tiny_model, "--data", dpo_scored / "vllm", "--output", tmp_path / "train",
        "--reward-column", "dpo_rewards", "--global-batch-size", "4", "--max-steps", "2", "--save-steps", "0",
        "--learning-rate", "2e-4", "--beta", "0.1", "--logging-steps", "1", "--max-length", "256",
        "--micro-batch-tokens", "1024", "--seed", "3"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_metrics(tmp_path / "train")) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_engine_process_ends_the_run_in_one_line_and_leaves_none_behind(tiny_model, scored, tmp_path,
                                                                               workers):
    """As the OOM killer would: kill -9 one vLLM engine process (of one of two data-parallel workers)."""
    output = tmp_path / "out"
    args = _command(tiny_model, scored["data"], output, *scored["small"], "--data-parallel-size", str(workers))
    _stop_while_scoring(args, output, workers, lambda process, engines: engines[0].kill())


def test_ctrl_c_under_a_script_that_ignores_it_ends_the_run_in_one_line(tiny_model, scored, tmp_path):
    """A script with `trap '' INT` starts treg-score with SIGINT ignored; Ctrl-C then reaches the engine alone,
    which stops, and treg-score must not wait for it for ever."""
    args = ["bash", "-c", "trap '' INT; exec \"$@\"", "bash",
            *_command(tiny_model, scored["data"], tmp_path / "out", *scored["small"])]
    _stop_while_scoring(args, tmp_path / "out", 1, lambda process, engines: os.killpg(process.pid, signal.SIGINT))


def _command_line(process) -> str:
    """A process's command line and name; empty for one that exited (a zombie) while the tree was listed."""
    import psutil

    try:
        return " ".join(process.cmdline()) + process.name()
    except psutil.Error:
        return ""


def _stop_while_scoring(args: list, output, engines_at_least: int, stop) -> None:
    """Start `args` in a session of its own, `stop(process, engine processes)` once shards are being written, then
    check the run ends within 30 s, saying the engine died and the complete shards are kept, and leaves no process."""
    import psutil

    process = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.time() + 600
        while not list((output / "data").glob("*.parquet")):  # scoring: every engine is up
            assert process.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
            time.sleep(0.05)
        tree = psutil.Process(process.pid).children(recursive=True)
        engines = [p for p in tree if "EngineCore" in _command_line(p)]
        assert len(engines) >= engines_at_least, [(p.name(), p.cmdline()) for p in tree]
        stop(process, engines)
        stopped = time.time()
        _, stderr = process.communicate(timeout=120)
        assert time.time() - stopped < 30 and process.returncode not in (0, None)
        assert "died" in stderr and "complete shards are kept: rerun the same command to continue" in stderr
        time.sleep(2)
        left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [(p.pid, p.name()) for p in left]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
