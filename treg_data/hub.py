"""Share scored shards on the Hugging Face Hub with a dataset card that the Hub's viewer and
`datasets.load_dataset` understand."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from treg_data.contract import DATA_DIR, MANIFEST, SHARD_GLOB, SKIPPED, provenance_schema
from treg_data.errors import UserError, first_line
from treg_data.reward_stats import RewardDistribution, markdown_table, reward_distribution, summary_line
from treg_data.rewards import DPO_REWARD_TRANSFORM, REWARD_TRANSFORM

UPLOADED = ["README.md", MANIFEST, SKIPPED, f"{DATA_DIR}/{SHARD_GLOB}"]
CARD_MARK = "<!-- dataset card written by treg-push -->"  # a README.md without it is the user's


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise UserError(f"{folder} has no manifest.json: finish scoring (every worker) before sharing it")
    return json.loads(path.read_text())


def source_license(dataset: str) -> str | None:
    """The licence on the source dataset's Hub card, when the source is a reachable Hub dataset."""
    if Path(dataset).exists() or dataset.count("/") != 1:
        return None
    try:
        from huggingface_hub import DatasetCard

        return DatasetCard.load(dataset).data.license
    except Exception:  # offline, private or no card: the caller falls back to "unknown"
        return None


def dataset_card(manifest: dict, repo_id: str, license: str | None, num_bytes: int,
                 distribution: RewardDistribution) -> str:
    from datasets import Features

    provenance, counts = manifest["provenance"], manifest["counts"]
    split = provenance["split"]
    front = {
        "license": license or "unknown",
        "tags": ["treg", "dpo", "preference", "token-level-rewards"],
        "configs": [{"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}],
        "dataset_info": {
            # the columns the shards really have: the optional ones only if this run wrote them
            "features": Features.from_arrow_schema(provenance_schema(provenance))._to_yaml_list(),
            "splits": [{"name": split, "num_examples": counts["pairs_scored"], "num_bytes": num_bytes}],
        },
    }
    skipped = ", ".join(f"{k}: {v}" for k, v in counts["skipped_by_reason"].items()) or "none"
    prompts = provenance["revision_prompts"]
    dpo_row = (f"| `*_dpo_rewards` | `{DPO_REWARD_TRANSFORM}` per token, `dpo_logps` being the log-prob under the "
               f"DPO-trained model `{provenance['dpo_model']}` after the policy prompt |\n"
               if provenance.get("dpo_model") else "")
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---

# {repo_id}

Preference pairs from `{provenance['dataset']}` (split `{split}`) with a token-level reward for
every response token, computed by treg for T-REG (preference optimization with token-level
reward regularization). Scored by `{provenance['scorer_model']}`;
prompts rendered with the chat template of `{provenance['model']}`.

```python
from datasets import load_dataset
pairs = load_dataset("{repo_id}", split="{split}")
```

Train on it with `treg-train --model {provenance['model']} --data {repo_id} ...`.

## Reward

For each response token `y_t`, with the model's log-probs of that same token id after two revision
prompts (`x_better`, `x_worse`) that quote the conversation and the response:

    {REWARD_TRANSFORM}   (the *_better_logps and *_worse_logps columns)

which lies in (-0.5, 0.5). The raw log-probs are kept, so other transforms need no rescoring.

### How r̂ is distributed here

{summary_line(distribution)}.

{markdown_table(distribution)}

(share of each side's response tokens per r̂ bin)

## Columns

| column | meaning |
|---|---|
| `id` | the input's id, or a content hash |
| `prompt`, `chosen`, `rejected` | the pair as messages (TRL's conversational format with an explicit prompt) |
| `prompt_ids` | the prompt rendered with the chat template, generation prompt included |
| `chosen_ids`, `rejected_ids` | response token ids, end-of-turn included; the sequence is `prompt_ids + chosen_ids` |
| `*_ref_logps` | log-prob of each response token after the policy prompt (the reference model) |
| `*_better_logps`, `*_worse_logps` | log-prob of each response token after `x_better` / `x_worse` |
| `*_rewards` | the token reward above |
{dpo_row}
## Revision prompts

`x_better`:

```
{prompts['better']}
```

`x_worse`:

```
{prompts['worse']}
```

## Provenance

- pairs read: {counts['pairs_read']}, scored: {counts['pairs_scored']}, skipped: {counts['pairs_skipped']} ({skipped})
- tokens scored: {counts['tokens']}
- source licence: {license or 'unknown'} (carried over from the source dataset)

```json
{json.dumps(provenance, indent=2, ensure_ascii=False)}
```

{CARD_MARK}
"""


def write_card(folder: str | Path, repo_id: str, license: str | None = None) -> Path:
    """Write README.md, unless the folder holds a README.md of the user's own: that one is kept."""
    path = Path(folder) / "README.md"
    if path.exists() and CARD_MARK not in path.read_text(encoding="utf-8", errors="replace"):
        return path
    manifest = load_manifest(folder)
    license = license or source_license(manifest["provenance"]["dataset"])
    num_bytes = sum(pq.ParquetFile(Path(folder) / shard).metadata.row_group(g).total_byte_size
                    for shard in manifest["shards"] for g in range(pq.ParquetFile(Path(folder) / shard).num_row_groups))
    distribution = reward_distribution([Path(folder) / shard for shard in manifest["shards"]])
    path.write_text(dataset_card(manifest, repo_id, license, num_bytes, distribution), encoding="utf-8")
    return path


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, license: str | None = None) -> str:
    """Write the card, then upload card, manifest and shards. Local files are never changed
    beyond treg's own README.md, and not before the upload can start. The token comes from
    HF_TOKEN or the stored login and is never printed."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if repo_id.count("/") != 1:
        raise UserError(f"the Hub repository must be ORG/NAME, got {repo_id!r}")
    load_manifest(folder)  # a finished folder
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    write_card(folder, repo_id, license)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder), allow_patterns=UPLOADED,
                          commit_message="Upload treg-scored shards")
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise UserError(f"the Hub refused the upload to {repo_id} (HTTP {status}): "
                            "the token cannot write there") from None
        raise UserError(f"the upload to {repo_id} failed: {first_line(err)}") from None
    except Exception as err:  # connection refused, DNS, timeouts: the network, not the data
        raise UserError(f"cannot reach the Hugging Face Hub ({type(err).__name__}); "
                        f"local data in {folder} is intact") from None
    return f"https://huggingface.co/datasets/{repo_id}"
