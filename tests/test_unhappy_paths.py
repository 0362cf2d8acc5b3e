"""What a careless or hostile user does: each case must end in one clear line (or a counted skip),
never in a wrong result that says "finished", and never cost the user a file."""

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (
    assert_one_line_error,
    hf_score_config,
    make_learnable_pairs,
    make_pairs,
    run,
    train_command,
    write_jsonl,
)

from treg_core.errors import UserError
from treg_data import pipeline

TRAIN = ["--global-batch-size", "8", "--learning-rate", "2e-4", "--beta", "0.1", "--logging-steps", "1",
         "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3"]


def _train(model, data, output, *extra):
    return run(train_command("--model", model, "--data", data, "--output", output, *TRAIN, *extra), timeout=600)


# ---- training -------------------------------------------------------------------------------


def _with_a_nan_reward(shards: str, folder: Path) -> tuple[Path, str]:
    """A copy of a scored folder in which one token reward of one pair is NaN."""
    shutil.copytree(shards, folder)
    shard = sorted((folder / "data").glob("*.parquet"))[1]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[3]["chosen_rewards"][2] = float("nan")
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), shard, row_group_size=1000)
    return shard, rows[3]["id"]


def test_a_nan_token_reward_stops_the_run_naming_its_shard_and_pair(tiny_model, learnable_shards, tmp_path):
    shard, pair_id = _with_a_nan_reward(learnable_shards, tmp_path / "scored")
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "12", "--save-steps", "0")
    assert_one_line_error(result, shard.name, pair_id, "chosen_rewards", "NaN or infinite")
    assert not (tmp_path / "run" / "final").exists()


def test_a_nan_in_the_eval_data_stops_the_run_before_its_first_step(tiny_model, learnable_shards, tmp_path):
    shard, pair_id = _with_a_nan_reward(learnable_shards, tmp_path / "held-out")
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--eval-data", tmp_path / "held-out",
                    "--max-steps", "4", "--save-steps", "0")
    assert_one_line_error(result, shard.name, pair_id, "chosen_rewards", "NaN or infinite")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # found before any step, not after the last


def test_a_diverging_run_stops_at_its_step_and_exports_nothing(tiny_model, learnable_shards, tmp_path):
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--max-steps", "12", "--save-steps", "1",
                    "--learning-rate", "1e9")
    assert_one_line_error(result, "not finite", "at step", "nothing was exported")
    assert not (tmp_path / "run" / "final").exists()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept and all(not name.endswith(".tmp") for name in kept)  # the good checkpoints stay


@pytest.fixture(scope="module")
def finished_run(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "finished"
    result = _train(tiny_model, learnable_shards, output, "--max-steps", "4", "--save-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.parametrize("changed", [["--loss", "dpo"], ["--global-batch-size", "4"], ["--learning-rate", "1e-4"],
                                     ["--seed", "4"]], ids=lambda c: c[0])
def test_resume_with_other_settings_is_refused_naming_them(tiny_model, learnable_shards, finished_run, changed):
    before = (finished_run / "metrics.jsonl").read_text()
    result = _train(tiny_model, learnable_shards, finished_run, "--max-steps", "4", "--save-steps", "2", "--resume",
                    *changed)
    assert_one_line_error(result, "--resume", changed[0])
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_resume_may_extend_the_run_and_change_logging(tiny_model, learnable_shards, finished_run, tmp_path):
    extended = tmp_path / "extended"
    shutil.copytree(finished_run, extended)
    result = _train(tiny_model, learnable_shards, extended, "--max-steps", "6", "--save-steps", "3", "--resume",
                    "--logging-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (extended / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 4, 6]
    # The schedule spans the new total from the resumed step on (cosine over 6 steps, no warmup), and says so.
    assert "the learning-rate schedule now spans 6 steps instead of 4" in result.stderr
    assert lines[2]["learning_rate"] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))


def test_resume_says_what_it_does(tiny_model, learnable_shards, finished_run, tmp_path):
    before = (finished_run / "metrics.jsonl").read_text()
    result = _train(tiny_model, learnable_shards, finished_run, "--max-steps", "4", "--save-steps", "2", "--resume")
    assert_one_line_error(result, "finished at step 4", "nothing to resume")
    assert (finished_run / "metrics.jsonl").read_text() == before
    killed = tmp_path / "killed"  # a run killed after its checkpoint at step 2
    shutil.copytree(finished_run, killed)
    shutil.rmtree(killed / "final")
    (killed / "finished.json").unlink()
    result = _train(tiny_model, learnable_shards, killed, "--max-steps", "1", "--save-steps", "2", "--resume")
    assert_one_line_error(result, "--max-steps 1 is below the step 2 of the newest checkpoint")
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", killed, *TRAIN,
                               "--max-steps", "4", "--save-steps", "2", "--resume", processes=2), timeout=600)
    assert result.returncode != 0  # torchrun's agent adds its own report of the failed processes
    assert "was written by 1 process(es), this run has 2; resume it with 1" in result.stderr
    assert not (killed / "final").exists()


def test_an_output_folder_holding_a_run_is_refused_without_resume(tiny_model, learnable_shards, finished_run):
    def files():  # the lock file names the latest process that held it: not the run's
        return {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if not p.name.startswith(".treg-lock")}

    before = files()
    result = _train(tiny_model, learnable_shards, finished_run, "--max-steps", "4", "--save-steps", "0")
    assert_one_line_error(result, "already holds a run", "--resume")
    assert files() == before


def test_an_output_folder_of_other_files_is_refused(tiny_model, learnable_shards, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    result = _train(tiny_model, learnable_shards, tmp_path / "mine", "--max-steps", "2")
    assert_one_line_error(result, "treg did not write", "notes.txt")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_an_unfinished_scoring_folder_is_refused(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(48))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", num_workers=3, worker_index=0))
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, "not a finished treg-score output", "1 of 3 workers")
    assert not (tmp_path / "run" / "final").exists()


def test_reference_log_probs_of_another_scorer_are_refused(tiny_model, tmp_path):
    import shutil

    scorer = shutil.copytree(tiny_model, tmp_path / "scorer")  # same vocabulary, another model
    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(16))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", scorer_model=str(scorer)))
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, f"come from the --scorer-model {scorer}", f"--ref-model {tiny_model}")
    assert not (tmp_path / "run").exists()


def test_a_rank_whose_pairs_are_all_too_long_still_logs_with_the_others(tiny_model, tmp_path):
    """With one pair per rank and step, the step that holds the one long pair leaves its rank with dummy forwards
    only: every rank must still reduce the same metric names, or the log line would break the collective."""
    rows = make_learnable_pairs(16)
    rows[5]["chosen"] = " ".join(["The sum is what it is."] * 12)
    pipeline.run(hf_score_config(tiny_model, write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path / "scored"))
    scored = pq.read_table(tmp_path / "scored" / "data").to_pylist()
    lengths = sorted(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in scored)
    assert lengths[-1] > lengths[-2]
    result = run(train_command("--model", tiny_model, "--data", tmp_path / "scored", "--output", tmp_path / "run",
                               "--global-batch-size", "2", "--max-steps", "8", "--logging-steps", "1",
                               "--max-length", str(lengths[-2]), "--micro-batch-tokens", "1024", "--save-steps", "0",
                               processes=2), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_too_long"] for m in metrics].count(0.5) == 1  # one pair of one rank, averaged over 2 ranks
    assert all("loss" in m for m in metrics)


def test_max_length_below_every_pair_is_one_clear_line(tiny_model, learnable_shards, tmp_path):
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--max-steps", "3", "--max-length", "16")
    assert_one_line_error(result, "longer than --max-length 16")
    assert not (tmp_path / "run" / "final").exists()


# ---- scoring --------------------------------------------------------------------------------


def test_a_conversation_the_template_refuses_is_a_skip_with_its_reason(tmp_path):
    from families import build_family_model

    model = build_family_model("gemma2", tmp_path / "gemma2")
    rows = make_pairs(8)  # two of them start with a system turn, which Gemma's template refuses
    summary = pipeline.run(hf_score_config(model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out"))
    assert summary.skipped_by_reason == {"template_error": 2} and summary.pairs_scored == 6


def test_a_repeated_id_and_an_unknown_role_are_warned_about_and_the_pairs_kept(tiny_model, tmp_path, capsys):
    rows = make_pairs(6)
    rows[4]["id"] = rows[1]["id"]
    rows[5]["prompt"][1]["role"] = "usr"  # a typo the chat template would write into the prompt as spelt
    summary = pipeline.run(hf_score_config(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out"))
    err = capsys.readouterr().err
    assert summary.pairs_scored == 6 and summary.duplicate_ids == 1 and "duplicate ids  1" in summary.text()
    assert f"input row 4 has the id {rows[1]['id']!r} of an earlier row" in err
    assert f"pair {rows[5]['id']} (input row 5): the role 'usr' is none of" in err


def test_an_output_folder_of_other_files_is_never_written(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(6))
    theirs = tmp_path / "theirs"
    (theirs / "data").mkdir(parents=True)
    files = {"manifest.json": '{"mine": true}', "skipped.jsonl": "{}\n", "data/train-00000-of-00001-00000.parquet": "x"}
    for name, text in files.items():
        (theirs / name).write_text(text)
    with pytest.raises(UserError, match="treg did not write"):
        pipeline.run(hf_score_config(tiny_model, data, theirs))
    assert {str(p.relative_to(theirs)): p.read_text() for p in theirs.rglob("*") if p.is_file()} == files


def test_rows_appended_to_the_input_are_never_silently_left_out(tiny_model, tmp_path):
    rows = make_pairs(12)
    data = write_jsonl(tmp_path / "d.jsonl", rows[:8])
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    write_jsonl(tmp_path / "d.jsonl", rows)  # four more rows, same path
    with pytest.raises(UserError, match="input"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    summary = pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", overwrite=True))
    assert summary.pairs_read == 12 and summary.pairs_scored == 12


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    from treg_train.config import build_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: m\ndata: d\nlearning_rate: 5e-7\nglobal_batch_size: '64'\nalpha: 1\n")
    config = build_config(str(config_file), {"output": "o"})
    assert (config.learning_rate, config.global_batch_size, config.alpha) == (5e-7, 64, 1.0)
    assert isinstance(config.alpha, float)
    config_file.write_text("model: m\ndata: d\nlearning_rate: fast\n")
    with pytest.raises(UserError, match="learning_rate must be a number"):
        build_config(str(config_file), {"output": "o"})


def test_a_model_that_does_not_load_is_one_line(learnable_shards, tmp_path):
    result = _train(str(tmp_path / "no-such-model"), learnable_shards, tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, "cannot load the tokenizer of --model")


def test_a_failed_start_leaves_the_output_folder_usable(tiny_model, learnable_shards, tmp_path):
    result = _train(str(tmp_path / "typo"), learnable_shards, tmp_path / "run", "--max-steps", "2")
    assert result.returncode == 2
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--max-steps", "2", "--save-steps", "0")
    assert result.returncode == 0, result.stderr[-3000:]


def test_max_model_len_beyond_the_models_context_is_refused_before_any_work(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(4))
    with pytest.raises(UserError, match="beyond the model's context of 2048"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", max_model_len=4096))
    assert not (tmp_path / "out").exists()


def test_a_data_parallel_worker_error_is_one_line(tmp_path):
    from treg_data.data_parallel import run_data_parallel

    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(4))
    with pytest.raises(UserError, match=r"worker \d: model folder .* does not exist"):
        run_data_parallel(hf_score_config("./no-such-model", data, tmp_path / "out"), 2)


@pytest.mark.parametrize("column, value", [("chosen_ref_logps", 0.5), ("rejected_better_logps", -1e30),
                                           ("chosen_rewards", 0.75)])
def test_shard_values_outside_their_range_are_named(tiny_model, learnable_shards, tmp_path, column, value):
    shutil.copytree(learnable_shards, tmp_path / "scored")
    shard = sorted((tmp_path / "scored" / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[5][column][1] = value
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), shard, row_group_size=1000)
    loss = "tis_dpo" if "better" in column else "dpo_reg"  # TIS-DPO reads better_logps by default
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "12", "--save-steps", "0",
                    "--loss", loss)
    assert_one_line_error(result, shard.name, rows[5]["id"], column, "outside its range")
    assert not (tmp_path / "run" / "final").exists()


def test_a_missing_dataset_file_and_a_mistyped_column_are_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--dataset nosuch.jsonl: no such file or folder"):
        pipeline.run(hf_score_config(tiny_model, "nosuch.jsonl", tmp_path / "out"))
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(6))
    with pytest.raises(UserError, match=r"--chosen-column answer_good: none of the first \d+ input rows has it"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "typo", chosen_column="answer_good"))
    summary = pipeline.run(hf_score_config(tiny_model, data, tmp_path / "typo"))  # the same folder, fixed
    assert summary.pairs_scored == 6


def test_a_truncated_input_file_is_one_line(tiny_model, tmp_path):
    import pyarrow as pa

    rows = pa.table({"prompt": ["a"] * 50, "chosen": ["b"] * 50, "rejected": ["c"] * 50})
    pq.write_table(rows, tmp_path / "in.parquet")
    data = (tmp_path / "in.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.parquet is not a readable Parquet file"):
        pipeline.run(hf_score_config(tiny_model, str(tmp_path / "cut.parquet"), tmp_path / "out"))


def test_a_library_message_over_several_lines_is_one_whole_line():
    from treg_core.errors import first_line

    err = OSError("Can't load the tokenizer. Make sure 'x' is the\ncorrect path to a directory containing\n"
                  "all relevant files.")
    assert first_line(err) == ("Can't load the tokenizer. Make sure 'x' is the correct path to a directory "
                               "containing all relevant files.")
    long = ValueError("First sentence. " + "word " * 200)
    assert first_line(long) == "First sentence." and first_line(ValueError("")) == "ValueError"
