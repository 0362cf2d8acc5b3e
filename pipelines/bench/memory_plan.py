"""treg-train's memory plan against the peak it measures, and the measurement its activation table comes from.

    python pipelines/bench/memory_plan.py                  # plan vs measured peak, tiny/small/medium, CPU
    python pipelines/bench/memory_plan.py --calibrate      # bytes a decoder layer keeps per token, by architecture

The first trains each shape for two steps with and without activation checkpointing and LoRA, each run in a
fresh process, and prints the plan the run printed at its start beside the peak it logged (peak RSS on a CPU,
peak allocated memory on a GPU). The pairs fill the forwards close to --micro-batch-tokens.

--calibrate counts, for one decoder layer of each architecture family, the bytes of every storage its forward
saves for the backward (autograd's saved-tensor hooks) at several shapes and precisions, and fits them to
(hidden, intermediate, 2 x kv heads x head dim, attention heads, 1): the table in treg_train/plan.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import local_model, pairs_file  # noqa: E402

# (size, settings): forwards of about --micro-batch-tokens tokens, two steps, the second after the optimizer exists
RUNS = {
    "tiny": dict(global_batch_size=16, micro_batch_tokens=2048),
    "small": dict(global_batch_size=16, micro_batch_tokens=2048),
    "medium": dict(global_batch_size=8, micro_batch_tokens=1536),
}
VARIANTS = {"plain": [], "checkpointing": ["--gradient-checkpointing", "true"], "lora": ["--lora-r", "16"],
            "checkpointing + lora": ["--gradient-checkpointing", "true", "--lora-r", "16"]}


def scored(work: Path) -> str:
    """Pairs scored once, by the tiny model: every size shares its tokenizer, and memory does not depend on
    the reference log-probs' values."""
    from treg_data import pipeline

    output = work / "scored"
    if not (output / "manifest.json").exists():
        pipeline.run(pipeline.ScoreConfig(model=local_model(work, "tiny"), dataset=str(pairs_file(work, 32)),
                                          output=str(output), backend="hf", dtype="float32", max_length=256,
                                          max_prompt_length=128, overwrite=True,
                                          reward_check=False))
    return str(output)


def measure(work: Path, size: str, variant: str) -> tuple[float, float]:
    """(planned, measured) peak GB of a two-step run."""
    model = local_model(work, size)
    output = work / f"run-{size}-{variant.replace(' + ', '-')}"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in RUNS[size].items()]
    result = subprocess.run([sys.executable, "-m", "treg_train", "--model", model, "--data", scored(work),
                             "--output", str(output), "--max-steps", "2", "--max-length", "256", "--logging-steps",
                             "1", "--save-steps", "0", *settings, *VARIANTS[variant]],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{size} {variant} failed:\n{result.stderr[-3000:]}")
    planned = float(re.search(r"memory plan: ([\d.]+) GB", result.stderr).group(1))
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return planned, max(line["peak_memory_gb"] for line in lines if "peak_memory_gb" in line)


def calibrate() -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    families = {"llama": LlamaConfig, "gemma2": Gemma2Config}
    shapes = [(512, 1408, 8, 8), (512, 2816, 8, 8), (512, 1408, 8, 2), (1024, 1408, 16, 16), (768, 2048, 12, 4)]
    for family, config_class in families.items():
        for dtype in (torch.float32, torch.bfloat16):
            rows, measured = [], []
            for hidden, intermediate, heads, kv_heads in shapes:
                config = config_class(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
                                      vocab_size=1000, attn_implementation="sdpa")
                layer_model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
                saved = [saved_bytes(layer_model, tokens, dtype) for tokens in (128, 256)]
                rows.append([hidden, intermediate, 2 * kv_heads * 64, heads, 1])
                measured.append((saved[1] - saved[0]) / 128)
            fit = np.linalg.lstsq(np.array(rows, float), np.array(measured), rcond=None)[0]
            error = float(np.max(np.abs(np.array(rows) @ fit - measured) / measured))
            print(f'("{family}", "{str(dtype)[6:]}"): ({", ".join(f"{c:.2f}" for c in fit)}),  '
                  f"# largest relative error of the fit {error:.1e}")


def saved_bytes(lm, tokens: int, dtype) -> int:
    """Bytes of the distinct storages one decoder layer's forward saves for the backward."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    hidden = torch.randn(1, tokens, lm.config.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rotary = lm.model.rotary_emb(hidden, positions)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lm.model.layers[0](hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small,medium")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default="/tmp/treg-bench-memory")
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    if args.calibrate:
        return calibrate()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':<8}{'run':<24}{'planned GB':>11}{'measured GB':>13}{'plan error':>12}")
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            planned, measured = measure(work, size, variant)
            print(f"{size:<8}{variant:<24}{planned:>11.2f}{measured:>13.2f}{planned / measured - 1:>+12.1%}",
                  flush=True)


if __name__ == "__main__":
    main()
