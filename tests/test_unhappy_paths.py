"""What a careless or hostile user does: each case must end in one clear line (or a counted skip),
never in a wrong result that says "finished", and never cost the user a file."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (
    assert_one_line_error,
    hf_score_config,
    make_learnable_pairs,
    make_pairs,
    run,
    score_command,
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


@pytest.mark.slow
def test_a_nan_token_reward_stops_the_run_naming_its_shard_and_pair(tiny_model, learnable_shards, tmp_path):
    shard, pair_id = _with_a_nan_reward(learnable_shards, tmp_path / "scored")
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "12", "--save-steps", "0")
    assert_one_line_error(result, shard.name, pair_id, "chosen_rewards", "NaN or infinite")
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_a_nan_in_the_eval_data_stops_the_run_before_its_first_step(tiny_model, learnable_shards, tmp_path):
    shard, pair_id = _with_a_nan_reward(learnable_shards, tmp_path / "held-out")
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--eval-data", tmp_path / "held-out",
                    "--max-steps", "4", "--save-steps", "0")
    assert_one_line_error(result, shard.name, pair_id, "chosen_rewards", "NaN or infinite")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # found before any step, not after the last


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_step_and_exports_nothing(tiny_model, learnable_shards, tmp_path):
    result = _train(tiny_model, learnable_shards, tmp_path / "run", "--max-steps", "12", "--save-steps", "1",
                    "--learning-rate", "1e9")
    # The first update already blows the weights up (finite, about 1e8): caught before its checkpoint is written.
    assert_one_line_error(result, "the weights after the update at step 1 have blown up", "nothing was exported")
    assert not (tmp_path / "run" / "final").exists()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


@pytest.fixture(scope="module")
def finished_run(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "finished"
    result = _train(tiny_model, learnable_shards, output, "--max-steps", "4", "--save-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("changed", [["--loss", "dpo"], ["--global-batch-size", "4"], ["--learning-rate", "1e-4"],
                                     ["--seed", "4"]], ids=lambda c: c[0])
def test_resume_with_other_settings_is_refused_naming_them(tiny_model, learnable_shards, finished_run, changed):
    before = (finished_run / "metrics.jsonl").read_text()
    result = _train(tiny_model, learnable_shards, finished_run, "--max-steps", "4", "--save-steps", "2", "--resume",
                    *changed)
    assert_one_line_error(result, "--resume", changed[0])
    assert (finished_run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
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


@pytest.mark.slow
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
    # Another number of processes may resume it (tests/test_elastic_resume.py), but only one that divides the batch.
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", killed, *TRAIN,
                               "--max-steps", "4", "--save-steps", "2", "--resume", processes=3), timeout=600)
    assert result.returncode != 0  # torchrun's agent adds its own report of the failed processes
    assert "--global-batch-size 8 must be a multiple of the 3 processes" in result.stderr
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


@pytest.mark.slow
def test_an_unfinished_scoring_folder_is_refused(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(48))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", num_workers=3, worker_index=0))
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, "not a finished treg-score output", "1 of 3 workers")
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_reference_log_probs_of_another_scorer_are_refused(tiny_model, tmp_path):
    import shutil

    scorer = shutil.copytree(tiny_model, tmp_path / "scorer")  # same vocabulary, another model
    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(16))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", scorer_model=str(scorer)))
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, f"come from the --scorer-model {scorer}", f"--ref-model {tiny_model}")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_model_that_does_not_load_is_one_line(learnable_shards, tmp_path):
    result = _train(str(tmp_path / "no-such-model"), learnable_shards, tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, "cannot load the tokenizer of --model")


@pytest.mark.slow
@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not"),
    ({"RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"},
     "RANK must be a whole number below WORLD_SIZE"),
])
def test_a_partial_launch_environment_is_one_line(env, expected, tiny_model, learnable_shards, tmp_path):
    """What torchrun sets, given in part: one line before any process group starts (it would wait or raise)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([str(a) for a in train_command("--model", tiny_model, "--data", learnable_shards,
                                                           "--output", tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert_one_line_error(result, expected, "torchrun")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_data_parallel_worker_error_is_one_line(tmp_path):
    from treg_data.data_parallel import run_data_parallel

    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(4))
    with pytest.raises(UserError, match=r"worker \d: model folder .* does not exist"):
        run_data_parallel(hf_score_config("./no-such-model", data, tmp_path / "out"), 2)


@pytest.mark.slow
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
    with pytest.raises(UserError, match="cut.parquet is damaged .*replace it with an intact copy"):
        pipeline.run(hf_score_config(tiny_model, str(tmp_path / "cut.parquet"), tmp_path / "out"))


# ---- damaged, locked and empty files; engines that do not start --------------------------------


def _damage_column(path: Path, name: str, row_group: int = 0) -> None:
    """Bytes in the middle of one column's pages overwritten, as a failing disk or copy leaves them: the file keeps
    its length, footer and metadata."""
    group = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = next(group.column(i) for i in range(group.num_columns)
                 if group.column(i).path_in_schema.split(".")[0] == name)
    middle = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle:middle + 32] = b"\x55" * 32
    path.write_bytes(bytes(data))


def test_an_input_file_damaged_in_the_middle_is_one_line_before_any_scoring(tiny_model, tmp_path):
    import pyarrow as pa

    table = pa.table({"prompt": [f"What is {i} plus {i + 1}?" for i in range(48)],
                      "chosen": [f"The sum of {i} and {i + 1} is {2 * i + 1}." for i in range(48)],
                      "rejected": [f"The sum of {i} and {i + 1} is {2 * i + 2}." for i in range(48)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=16)
    _damage_column(tmp_path / "in.parquet", "chosen", row_group=1)  # the file's middle third
    with pytest.raises(UserError, match="in.parquet is damaged .*replace it with an intact copy"):
        pipeline.run(hf_score_config(tiny_model, str(tmp_path / "in.parquet"), tmp_path / "out", shard_size=4))
    assert not list(tmp_path.glob("out/data/*.parquet"))  # refused before the first chunk, not in the middle


def _inspect(data, *extra):
    return run([sys.executable, "-m", "treg_data.inspect_cli", data, *extra], timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["overwritten", "cut"])
def test_a_damaged_shard_is_one_line_naming_it_in_treg_inspect(learnable_shards, tmp_path, damage):
    shutil.copytree(learnable_shards, tmp_path / "scored")
    shard = sorted((tmp_path / "scored" / "data").glob("*.parquet"))[1]
    if damage == "cut":
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    else:
        _damage_column(shard, "chosen_rewards")
    result = _inspect(tmp_path / "scored", "--random", "96")
    assert_one_line_error(result, f"{shard.name} is damaged", "score the data again")
    assert not (tmp_path / "scored" / "report.html").exists()


@pytest.mark.slow
def test_a_shard_damaged_in_the_middle_stops_training_in_one_line(tiny_model, learnable_shards, tmp_path):
    shutil.copytree(learnable_shards, tmp_path / "scored")
    for shard in (tmp_path / "scored" / "data").glob("*.parquet"):  # every one: whichever training reads first
        _damage_column(shard, "chosen_rewards")
    result = _train(tiny_model, tmp_path / "scored", tmp_path / "run", "--max-steps", "2", "--save-steps", "0")
    assert_one_line_error(result, "/data/train-", "is damaged", "score the data again")
    assert not (tmp_path / "run" / "final").exists()


def test_a_shard_column_of_the_wrong_type_is_named(learnable_shards, tmp_path):
    import pyarrow as pa

    from treg_data.report import select_rows
    from treg_train.index import ShardIndex

    shutil.copytree(learnable_shards, tmp_path / "scored")
    shard = sorted((tmp_path / "scored" / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    texts = pa.array([str(values) for values in table.column("chosen_rewards").to_pylist()])
    index = table.schema.get_field_index("chosen_rewards")
    pq.write_table(table.set_column(index, pa.field("chosen_rewards", pa.string()), texts), shard)
    with pytest.raises(UserError, match=f"{shard.name}: its column chosen_rewards is string, where treg-score writes"):
        ShardIndex(str(tmp_path / "scored"))
    with pytest.raises(UserError, match="its column chosen_rewards is string"):
        select_rows(tmp_path / "scored", sample=96)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_an_empty_input_file_is_one_line(tiny_model, tmp_path, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(UserError, match=f"--dataset .*empty{suffix} holds no rows"):
        pipeline.run(hf_score_config(tiny_model, str(tmp_path / f"empty{suffix}"), tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_run_that_skips_every_pair_fails_naming_the_skips(tiny_model, tmp_path):
    rows = [{"id": f"same-{i}", "prompt": "Hi", "chosen": "Same.", "rejected": "Same."} for i in range(3)]
    result = run(score_command("--model", tiny_model, "--dataset", write_jsonl(tmp_path / "d.jsonl", rows),
                               "--output", tmp_path / "out", "--backend", "hf", "--dtype", "float32"))
    assert_one_line_error(result, "every pair was skipped", str(tmp_path / "out" / "skipped.jsonl"), "--overwrite")
    assert "pairs skipped  3 (identical_responses 3)" in result.stdout


def test_a_missing_folder_is_never_looked_up_on_the_hub(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    with pytest.raises(UserError, match="--dataset no/such/dir: no such file or folder"):
        pipeline.run(hf_score_config(tiny_model, "no/such/dir", tmp_path / "out"))
    with pytest.raises(UserError, match="model folder models/no/such does not exist"):
        pipeline.run(hf_score_config("models/no/such", data, tmp_path / "out"))


def test_a_model_folder_without_tokenizer_files_says_so(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, bare / name)
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    with pytest.raises(UserError, match="has no tokenizer files .*copy them in from the model it was made from"):
        pipeline.run(hf_score_config(str(bare), data, tmp_path / "out"))


def test_inspect_shows_every_pair_that_shares_an_id_and_says_so(tiny_model, tmp_path, capsys):
    from treg_data.report import select_rows

    rows = make_pairs(12)
    for row in rows[2:9]:
        row["id"] = "shared"
    pipeline.run(hf_score_config(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "scored"))
    capsys.readouterr()
    shown = select_rows(tmp_path / "scored", ids=["shared", "pair-0"])
    assert [row["id"] for row in shown] == ["shared"] * 7 + ["pair-0"]
    assert "7 pairs share the id 'shared' (the input repeats it): all 7 are shown" in capsys.readouterr().err


def _as_a_user():
    """For a subprocess run by root: without root's licence to write into read-only folders (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH leave the capability bounding set, so the command run gets neither)."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "cannot drop a capability")


def _can_act_as_a_user() -> bool:
    if os.geteuid() != 0:
        return True
    effective = next(int(line.split()[1], 16) for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("CapEff:"))
    return bool(effective & 1 << 8)  # CAP_SETPCAP: may drop capabilities


needs_a_user = pytest.mark.skipif(not _can_act_as_a_user(), reason="root without CAP_SETPCAP cannot drop its rights")


@pytest.mark.slow
@needs_a_user
def test_a_read_only_data_folder_is_one_line_before_any_scoring(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(24))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", shard_size=8))
    output = shutil.copytree(tmp_path / "scored", tmp_path / "out")  # a folder this process holds no lock of
    for path in [output / "manifest.json", *output.glob("manifests/*"), sorted(output.glob("data/*.parquet"))[-1]]:
        path.unlink()  # as if killed before its last shard
    (output / "data").chmod(0o555)
    try:
        result = subprocess.run([str(a) for a in score_command(
            "--model", tiny_model, "--dataset", data, "--output", output, "--backend", "hf", "--dtype", "float32",
            "--max-length", "256", "--max-prompt-length", "128", "--shard-size", "8")],
            capture_output=True, text=True, timeout=300, preexec_fn=_as_a_user)
    finally:
        (output / "data").chmod(0o755)
    assert_one_line_error(result, f"cannot write {output / 'data'}: Permission denied", "writable")
    assert "scoring path" not in result.stderr  # found before the scorer started


@needs_a_user
def test_a_read_only_run_folder_is_one_line(tiny_model, learnable_shards, finished_run, tmp_path):
    killed = tmp_path / "killed"  # a run killed after its checkpoint at step 2, resumed
    shutil.copytree(finished_run, killed)
    shutil.rmtree(killed / "final")
    (killed / "finished.json").unlink()
    killed.chmod(0o555)
    try:
        result = subprocess.run([str(a) for a in train_command(
            "--model", tiny_model, "--data", learnable_shards, "--output", killed, *TRAIN, "--max-steps", "4",
            "--save-steps", "2", "--resume")], capture_output=True, text=True, timeout=600, preexec_fn=_as_a_user)
    finally:
        killed.chmod(0o755)
    assert_one_line_error(result, f"cannot write {killed / 'config.yaml'}: Permission denied")
    assert not (killed / "final").exists()


def _file_size_limit(limit: int):
    def limited():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limited


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_leaves_no_shard_a_rerun_would_trust(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(16))
    command = [str(a) for a in score_command(
        "--model", tiny_model, "--dataset", data, "--output", tmp_path / "out", "--backend", "hf", "--dtype",
        "float32", "--max-length", "256", "--max-prompt-length", "128", "--shard-size", "8")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(8192))
    assert_one_line_error(result, "cannot write", ".parquet: File too large", "ulimit -f")
    assert [p.name for p in (tmp_path / "out" / "data").iterdir() if p.suffix == ".parquet" or ".tmp" in p.name] == []
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pairs scored   16" in again.stdout


def test_the_cause_an_engine_logged_is_found_among_its_lines():
    from treg_data.scorers.engine_log import killed_processes, root_cause

    def logged(process, *lines):
        return [f"({process} pid=7) ERROR 12-06 16:53:29 [multiproc_executor.py:953] {line}" for line in lines]

    lines = (["(MainProcess pid=6) WARNING 12-06 16:53:03 [vllm.py:725] Model Runner V2 requires Triton"]
             + logged("Worker", "WorkerProc failed to start.", "Traceback (most recent call last):",
                      '  File "loader.py", line 5, in load', "    narrow(x)",
                      "RuntimeError: start (0) + length (320) exceeds dimension size (256).")
             + logged("EngineCore", "EngineCore failed to start.", "Traceback (most recent call last):",
                      "Exception: WorkerProc initialization failed. See stack trace for root cause.")
             + ["Traceback (most recent call last):", "Exception: WorkerProc initialization failed. See stack trace "
                "for root cause."])
    assert root_cause(lines) == "RuntimeError: start (0) + length (320) exceeds dimension size (256)."
    assert root_cause(logged("EngineCore", "Worker proc VllmWorker-0 died unexpectedly, shutting down executor.")) \
        == "Worker proc VllmWorker-0 died unexpectedly, shutting down executor."
    assert root_cause(["nothing went wrong"]) is None
    message = "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': -9}"
    assert killed_processes(message) == "its process EngineCore was killed by SIGKILL (from outside, or out of memory)"
    assert killed_processes("Failed core proc(s): {'EngineCore': 1}") is None


@pytest.mark.engine
def test_an_engine_that_fails_to_start_is_one_line_naming_its_cause(tiny_model, tmp_path):
    """A model whose config does not fit its weights: vLLM's worker fails loading them, and says why in its log."""
    model = shutil.copytree(tiny_model, tmp_path / "misfit")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 64}))
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(4))
    result = run(score_command("--model", model, "--dataset", data, "--output", tmp_path / "out", "--dtype", "float32",
                               "--max-length", "256", "--max-prompt-length", "128", "--enforce-eager"), timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.startswith("treg-score: error:")]
    assert len(last) == 1 and "engine failed to start: RuntimeError:" in last[0] and "exceeds dimension size" in last[0]
    assert "Engine core initialization failed" not in result.stderr  # the traceback of treg-score itself


def test_a_library_message_over_several_lines_is_one_whole_line():
    from treg_core.errors import first_line

    err = OSError("Can't load the tokenizer. Make sure 'x' is the\ncorrect path to a directory containing\n"
                  "all relevant files.")
    assert first_line(err) == ("Can't load the tokenizer. Make sure 'x' is the correct path to a directory "
                               "containing all relevant files.")
    long = ValueError("First sentence. " + "word " * 200)
    assert first_line(long) == "First sentence." and first_line(ValueError("")) == "ValueError"
