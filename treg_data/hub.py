"""Share scored shards on the Hugging Face Hub with a dataset card (card.md, filled here) that the Hub's
viewer and `datasets.load_dataset` understand."""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

import yaml

from treg_core.atomic import write_text
from treg_core.contract import (
    COLUMNS,
    DATA_DIR,
    MANIFEST,
    SHARD_GLOB,
    SKIPPED,
    Manifest,
    Provenance,
    TokenColumn,
    open_shard,
    output_root,
    read_manifest,
)
from treg_core.errors import UserError, first_line
from treg_core.sources import is_hub_id
from treg_data.edits import EDIT_DIFF_TRANSFORM
from treg_data.probe import BASELINE
from treg_data.reward_stats import RewardDistribution, markdown_table, reward_distribution, summary_line
from treg_data.rewards import REWARD_TRANSFORM

UPLOADED = ["README.md", MANIFEST, SKIPPED, f"{DATA_DIR}/{SHARD_GLOB}"]
CARD_MARK = "<!-- dataset card written by treg-push -->"  # a README.md without it is the user's
CARD = Path(__file__).with_name("card.md")


def source_license(dataset: str) -> str | None:
    """The licence on the source dataset's Hub card, when the source is a reachable Hub dataset."""
    if not is_hub_id(dataset):
        return None
    try:
        from huggingface_hub import DatasetCard

        return DatasetCard.load(dataset).data.license
    except Exception:  # offline, private or no card: the caller falls back to "unknown"
        return None


def front_matter(manifest: Manifest, license: str | None, num_bytes: int) -> str:
    """The card's YAML header: licence, tags, the data files and the features the shards really have."""
    from datasets import Features

    split = manifest.provenance.split
    files = [{"split": split, "path": f"{DATA_DIR}/{split}-*.parquet"}]
    return yaml.safe_dump({
        "license": license or "unknown",
        "tags": ["treg", "dpo", "preference", "token-level-rewards"],
        "configs": [{"config_name": "default", "data_files": files}],
        "dataset_info": {
            "features": Features.from_arrow_schema(manifest.provenance.schema)._to_yaml_list(),
            "splits": [{"name": split, "num_examples": manifest.counts.pairs_scored, "num_bytes": num_bytes}],
        },
    }, sort_keys=False, allow_unicode=True)


def dataset_card(manifest: Manifest, repo_id: str, license: str | None, num_bytes: int,
                 distribution: RewardDistribution) -> str:
    provenance, counts = manifest.provenance, manifest.counts
    column_rows = "".join(f"| `*_{name}` | {c.meaning}{_model_named(c, provenance)} |\n"
                          for name, c in COLUMNS.items() if name in provenance.column_names)
    return Template(CARD.read_text(encoding="utf-8")).substitute(
        front_matter=front_matter(manifest, license, num_bytes), repo_id=repo_id, dataset=provenance.dataset,
        split=provenance.split, scorer_model=provenance.scorer_model, model=provenance.model,
        reward_section=reward_section(provenance), reward_check=reward_check_text(manifest.reward_check),
        distribution_summary=summary_line(distribution),
        distribution_table=markdown_table(distribution), column_rows=column_rows,
        pairs_read=counts.pairs_read, pairs_scored=counts.pairs_scored, pairs_skipped=counts.pairs_skipped,
        skipped_by_reason=", ".join(f"{k}: {v}" for k, v in counts.skipped_by_reason.items()) or "none",
        tokens=counts.tokens, license=license or "unknown",
        provenance_json=json.dumps(provenance.to_dict(), indent=2, ensure_ascii=False), card_mark=CARD_MARK,
    )


def _model_named(column: TokenColumn, provenance: Provenance) -> str:
    """`: model` for a column an option's model writes, whose name the card does not give elsewhere."""
    return f": `{getattr(provenance, column.model)}`" if column.written_with and column.model != "scorer_model" else ""


def reward_section(provenance: Provenance) -> str:
    """What `*_rewards` holds: the revision prompts' r̂ with their texts, or edit-diff's labels."""
    if provenance.token_rewards == "edit-diff":
        return (f"`{EDIT_DIFF_TRANSFORM}`: the edited tokens are those outside the longest common prefix and suffix "
                "of the two answers' token ids; no revision prompt was scored.")
    prompts = provenance.revision_prompts
    return (f"For each response token `y_t`, with the model's log-probs of that same token id after two contexts "
            f"(`x_better`, `x_worse`; prompt set `{prompts['name']}`, {prompts['role']} role):\n\n"
            f"    {REWARD_TRANSFORM}   (the *_better_logps and *_worse_logps columns)\n\nwhich lies in (-0.5, 0.5). "
            "The raw log-probs are kept, so other transforms need no rescoring.\n\n`x_better`:\n\n```\n"
            f"{prompts['better']}\n```\n\n`x_worse`:\n\n```\n{prompts['worse']}\n```")


def reward_check_text(check: dict | None) -> str:
    """treg-score's reward check, as a sentence and a table by kind."""
    if not check:
        return "Not run (treg-score --no-reward-check, or edit-diff rewards: labels, not a model's judgement)."
    result, baseline = check["sets"][check["used"]], check[BASELINE]
    kinds = "\n".join(f"| {kind} | {r['auroc']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['lowest_on_edit']:.0%} |"
                      for kind, r in result["by_kind"].items())
    return (f"On treg's {check['pairs']} labelled minimal-edit pairs, the rewards of prompt set `{check['used']}` "
            f"located the edited tokens with an AUROC of {result['auroc']:.2f} (95% interval {result['ci'][0]:.2f}-"
            f"{result['ci'][1]:.2f}; 0.5 is chance); the scoring model's own log-prob alone gives "
            f"{baseline['auroc']:.2f}. The lowest r̂ of a rejected answer fell on the edit in "
            f"{result['lowest_on_edit']:.0%} of them.\n\n| kind | AUROC [95% interval] | lowest on the edit |\n"
            f"|---|---|---|\n{kinds}")


def write_card(folder: str | Path, repo_id: str, license: str | None = None) -> Path:
    """Write README.md, unless the folder holds a README.md of the user's own: that one is kept."""
    folder = output_root(folder)
    path = folder / "README.md"
    if path.exists() and CARD_MARK not in path.read_text(encoding="utf-8", errors="replace"):
        return path
    manifest = read_manifest(folder)
    license = license or source_license(manifest.provenance.dataset)
    shards = [open_shard(folder / shard) for shard in manifest.shards]
    num_bytes = sum(shard.metadata.row_group(g).total_byte_size
                    for shard in shards for g in range(shard.num_row_groups))
    distribution = reward_distribution([folder / shard for shard in manifest.shards])
    return write_text(path, dataset_card(manifest, repo_id, license, num_bytes, distribution))


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, license: str | None = None) -> str:
    """Write the card, then upload card, manifest and shards. Local files are never changed
    beyond treg's own README.md, and not before the upload can start. The token comes from
    HF_TOKEN or the stored login and is never printed."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not is_hub_id(repo_id):
        raise UserError(f"the Hub repository must be ORG/NAME, got {repo_id!r}")
    read_manifest(folder)  # a finished folder
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        write_card(folder, repo_id, license)  # once the Hub answered: a push that cannot start writes nothing
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder), allow_patterns=UPLOADED,
                          commit_message="Upload treg-scored shards")
    except UserError:  # the card's own write, said as it is
        raise
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
