"""Train, from scratch on the CPU, the small model of the credit-assignment benchmark.

One model plays both parts, as in the paper where the policy scores its own responses: asked a
task it answers like a mediocre student (the SFT starting policy, misconceptions included);
asked to revise a draft with this world's revision prompts it writes the right answer
("better") or a bad one ("worse"). Built once and cached:

    python pipelines/credit/build_model.py [--world zero|mixed] [--output FOLDER] [--steps 2400]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tiny_model
import policy  # noqa: E402
import world  # noqa: E402
from tiny_model import answer_batch, build_trained, train_from_scratch  # noqa: E402

MODEL_SHAPE = dict(hidden_size=192, num_layers=4, num_heads=3, intermediate_size=512)  # about 2 M parameters
KINDS = ("policy", "better", "worse")
CACHE = Path(os.path.expanduser("~/.cache/treg"))
FOLDERS = {"zero": CACHE / "credit-model-v2", "mixed": CACHE / "credit-model-mixed-v1"}  # by world
DEFAULT_FOLDER = FOLDERS["zero"]
DRAFT_SLIP = 0.2  # drafts quoted in revision examples carry more slips than the policy makes


def example(task: world.Task, kind: str, rng: random.Random) -> tuple[list[dict], str]:
    """(prompt messages, answer text) of one training example of the given kind."""
    from treg_data.revision_prompts import fill

    user = [{"role": "user", "content": task.prompt}]
    if kind == "policy":
        return user, world.answer_text(world.student_answer(task, rng))
    draft = world.student_answer(task, rng, slip=DRAFT_SLIP)
    request = fill(world.REVISION_PROMPTS[kind], user, world.answer_text(draft))
    answer = task.solution if kind == "better" else world.worse_answer(task, rng)
    return [{"role": "user", "content": request}], world.answer_text(answer)


def batch_tensors(tokenizer, rng: random.Random, size: int, kind: str,
                  world_name: str = "zero") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One padded batch of examples of one kind and one length set, short or long (they differ in
    length; this keeps padding low)."""
    lengths = rng.choice((world.SHORT, world.LONG))
    rows = [policy.encode(tokenizer, *example(world.random_task(rng, lengths, world_name), kind, rng))
            for _ in range(size)]
    return answer_batch(rows, tokenizer.pad_token_id)


def build(folder: Path = DEFAULT_FOLDER, steps: int = 2400, batch: int = 32, lr: float = 3e-3, seed: int = 0,
          world_name: str = "zero") -> Path:
    """Train and save the model of a world into `folder` (written aside, then renamed: never half there)."""

    def train(model, tokenizer) -> None:
        print(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M-parameter model, "
              f"{steps} steps of {batch}", flush=True)
        rng = random.Random(seed)

        def loss_at(step: int) -> torch.Tensor:
            input_ids, labels, attention = batch_tensors(tokenizer, rng, batch, KINDS[step % len(KINDS)], world_name)
            return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss

        train_from_scratch(model, loss_at, steps, lr, weight_decay=0.01, floor=0.1, seed=seed)

    return build_trained(folder, train, seed=seed, **MODEL_SHAPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=sorted(FOLDERS), default="zero")
    parser.add_argument("--output", type=Path, help="default: the world's cache folder")
    parser.add_argument("--steps", type=int, default=2400)
    args = parser.parse_args()
    print(f"model in {build(args.output or FOLDERS[args.world], steps=args.steps, world_name=args.world)}")


if __name__ == "__main__":
    main()
