"""Sharing on the Hub: the card and the folder load with `datasets`; upload failures give one
line, never the token, and leave the local data as it was."""

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import pytest
import yaml
from huggingface_hub import DatasetCard

from treg_core.contract import SCHEMA
from treg_data.hub import write_card

TOKEN = "hf_treg_test_secret_token"


@pytest.fixture
def folder(learnable_shards, tmp_path):
    return Path(shutil.copytree(learnable_shards, tmp_path / "scored"))


def test_card_parses_and_the_folder_loads_with_datasets(folder):
    card_path = write_card(folder, "treg/learnable", license="apache-2.0")
    text = card_path.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "apache-2.0"
    assert front["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*.parquet"}
    assert [f["name"] for f in front["dataset_info"]["features"]] == SCHEMA.names
    card = DatasetCard(text)
    assert card.data.license == "apache-2.0"
    assert "sigmoid(better_logps - worse_logps) - 0.5" in text and "Revise the response" in text

    loaded = datasets.load_dataset(str(folder), split="train")
    assert loaded.num_rows == 96
    assert loaded.features == datasets.Features.from_arrow_schema(SCHEMA)


def test_card_of_a_folder_with_dpo_rewards_lists_them_and_loads(tiny_model, tmp_path):
    from helpers import hf_score_config, make_pairs, write_jsonl

    from treg_core.contract import shard_schema
    from treg_data import pipeline

    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(6))
    folder = tmp_path / "scored"
    pipeline.run(hf_score_config(tiny_model, data, folder, dpo_model=tiny_model, reverse_dpo_model=tiny_model))
    text = write_card(folder, "treg/with-dpo").read_text()
    front = yaml.safe_load(text.split("---")[1])
    schema = shard_schema(dpo=True, reverse_dpo=True)
    assert [f["name"] for f in front["dataset_info"]["features"]] == schema.names
    assert "| `*_dpo_rewards` | `sigmoid(dpo_logps - ref_logps) - 0.5`" in text
    assert "| `*_dpo_logps` |" in text and "| `*_rev_dpo_logps` |" in text
    loaded = datasets.load_dataset(str(folder), split="train")
    assert loaded.num_rows == 6
    assert loaded.features == datasets.Features.from_arrow_schema(schema)


def test_card_shows_how_the_rewards_are_distributed(folder):
    import pyarrow.parquet as pq

    text = write_card(folder, "treg/learnable").read_text()
    rows = pq.read_table(folder / "data").to_pylist()
    sums = {side: sum(sum(row[f"{side}_rewards"]) for row in rows) / len(rows) for side in ("chosen", "rejected")}
    values = [v for row in rows for side in ("chosen", "rejected") for v in row[f"{side}_rewards"]]
    assert f"{len(values):,} response tokens, {sum(v > 0 for v in values) / len(values):.1%} with r̂ > 0" in text
    assert f"mean Σ r̂ per response: chosen {sums['chosen']:+.3f}, rejected {sums['rejected']:+.3f}" in text
    table = [line for line in text.splitlines() if line.startswith("| `") and line.endswith("|") and "%" in line]
    assert len(table) == 10


def _checksums(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "data").glob("*.parquet"))}


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = b'{"error": "You don\'t have the rights to create a dataset under this namespace"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _deny

    def log_message(self, *args):
        pass


@pytest.fixture
def forbidding_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _push(folder, env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "treg_data.push_cli", str(folder), "treg/learnable"],
                          capture_output=True, text=True, timeout=300, env={**clean, **env})


@pytest.mark.parametrize("case", ["no-token", "no-permission", "no-network"])
def test_upload_errors_are_one_line_and_keep_local_data(folder, forbidding_hub, tmp_path, case):
    before = _checksums(folder)
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if case != "no-token":
        env["HF_TOKEN"] = TOKEN
        env["HF_ENDPOINT"] = forbidding_hub if case == "no-permission" else "http://127.0.0.1:9"
    result = _push(folder, env)
    expected = {"no-token": "no Hugging Face token", "no-permission": "HTTP 403",
                "no-network": "cannot reach the Hugging Face Hub"}[case]
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert _checksums(folder) == before and (folder / "manifest.json").exists()
    assert not (folder / "README.md").exists()  # the card is written once the Hub has answered


def test_unfinished_folder_is_not_shared(folder):
    (folder / "manifest.json").unlink()
    result = _push(folder, {"HF_TOKEN": TOKEN})
    assert result.returncode == 2 and "finish scoring" in result.stderr


def test_a_users_own_readme_is_never_overwritten(folder, forbidding_hub, tmp_path):
    (folder / "README.md").write_text("# My own card\n")
    assert write_card(folder, "treg/learnable").read_text() == "# My own card\n"
    result = _push(folder, {"HF_TOKEN": TOKEN, "HF_ENDPOINT": forbidding_hub, "HF_HOME": str(tmp_path / "hf-home")})
    assert result.returncode == 2 and (folder / "README.md").read_text() == "# My own card\n"


def test_nothing_is_written_before_the_upload_can_start(folder, tmp_path):
    result = _push(folder, {"HF_HOME": str(tmp_path / "hf-home")})  # no token
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr
    assert not (folder / "README.md").exists()


def test_a_folder_treg_score_did_not_write_is_not_called_unfinished(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".treg").write_text("treg-train")
    result = _push(tmp_path / "run", {"HF_TOKEN": TOKEN})
    assert result.returncode == 2 and "is not a treg-score output (no manifest.json, no shards)" in result.stderr
    assert "finish scoring" not in result.stderr
