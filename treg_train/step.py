"""One rank's share of a global batch: the pairs within --max-length, cut into as many micro-batches as on
every other rank, each forward turned into per-pair losses and metrics; with a gradient for training
(`train_step`), without one for evaluation (`evaluate`).

Every rank must run the same number of forwards (and backwards): FSDP gathers and reduces each layer in
collectives that all ranks join, so a rank with fewer pairs runs dummy micro-batches weighted zero.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from treg_core.forward import TopKReference, selected_token_logprobs
from treg_train.collate import ModelInputs, collate, micro_batches, scatter_tokens
from treg_train.index import TrainingPair
from treg_train.losses import LossSettings, SideTokens, preference_loss, token_reward_agreement
from treg_train.metrics import MetricWindow
from treg_train.objectives import WEIGHTINGS, method
from treg_train.readers import EvalReader, rank_slice


@dataclass
class Batching:
    """How a rank cuts its pairs into forwards. With `pack_lengths` (a kernel compiled per shape, such as flex
    attention), each pack is made as long as the smallest of them that holds it, so that kernel compiles for
    those few lengths only."""

    max_length: int
    micro_batch_tokens: int
    padding_free: bool  # sequences packed back to back, no padding
    device: torch.device
    pack_lengths: tuple[int, ...] = ()
    packs_seen: set = field(default_factory=set)  # the pack lengths used so far

    def inputs(self, pairs: list[TrainingPair]) -> ModelInputs:
        pack_to = None
        if self.padding_free and self.pack_lengths:
            pack_to = next(n for n in self.pack_lengths if n >= sum(p.num_tokens for p in pairs))
            if pack_to not in self.packs_seen and (not dist.is_initialized() or dist.get_rank() == 0):
                tqdm.write(f"treg-train: packs of {pack_to} tokens: compiling for this length "
                           f"({len(self.packs_seen) + 1} of at most {len(self.pack_lengths)})", file=sys.stderr)
            self.packs_seen.add(pack_to)
        return collate(pairs, self.padding_free, pack_to).to(self.device)


def pack_lengths(micro_batch_tokens: int, count: int = 4) -> tuple[int, ...]:
    """`count` lengths up to --micro-batch-tokens, evenly spaced, each a multiple of 128 (flex attention's block)."""
    return tuple(sorted({-(-micro_batch_tokens * k // count // 128) * 128 for k in range(1, count + 1)}))


@dataclass
class Objective:
    """What turns a micro-batch into per-pair losses: the policy, the online reference if any (None: the
    shards' reference log-probs stand in), and the loss."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    settings: LossSettings

    def losses(self, inputs: ModelInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses [pairs] and per-pair metrics, each summed later over the pairs."""
        args = (inputs.input_ids, inputs.position_ids, inputs.predict_index, inputs.targets)
        row = method(self.settings.loss_type)
        ref_logps, reference = inputs.ref_logps, None  # the shards' unless a reference is held
        if self.reference is not None:
            with torch.no_grad():
                if row.needs_reference_distribution:  # its states once: its log-probs here, its distribution beside
                    reference = self.reference.exact_reference(self.reference(*args, hidden_only=True))  # the policy's
                    flat = selected_token_logprobs(reference.hidden, reference.output_layer, inputs.targets,
                                                   reference.transform, self.reference.chunk_rows).logps
                else:
                    flat = self.reference(*args).logps
            ref_logps = scatter_tokens(flat, inputs.token_mask)
        elif row.needs_reference_distribution:
            reference = TopKReference(inputs.ref_topk_ids, inputs.ref_topk_logps)
        out = self.policy(*args, with_log_sum_sq=row.pair_weight == "wpo", reference=reference,
                          with_hidden=WEIGHTINGS[self.settings.weighting].reads_hidden_states)
        per_token = {name: None if values is None else scatter_tokens(values, inputs.token_mask)
                     for name, values in (("logps", out.logps), ("log_sum_sq_probs", out.log_sum_sq), ("kl", out.kl),
                                          ("hidden", out.hidden))}
        n = inputs.num_pairs
        sides = [SideTokens(rewards=inputs.rewards[rows], mask=inputs.token_mask[rows],
                            signal=None if inputs.signal is None else inputs.signal[rows],
                            ref_logps=ref_logps[rows], prompt_length=inputs.prompt_lengths[rows],
                            **{name: None if values is None else values[rows] for name, values in per_token.items()})
                 for rows in (slice(0, n), slice(n, 2 * n))]
        losses, metrics = preference_loss(*sides, self.settings)
        metrics["token_reward_agreement"] = token_reward_agreement(*sides, self.settings.beta) * n
        return losses, metrics


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (0 where this torch does not say)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # noqa: BLE001 - a private helper: its absence only hides the figure
        return 0.0


def rank_micro_batches(pairs: list[TrainingPair], filler: TrainingPair, batching: Batching,
                       metrics: MetricWindow) -> list[tuple[list[TrainingPair], bool]]:
    """This rank's pairs within --max-length (the others counted as skipped) in micro-batches of at most
    --micro-batch-tokens, padded with dummies up to the most any rank has; each as (pairs, real). A dummy is
    `filler` cut to one token: the cheapest forward, and never beyond --max-length."""
    kept = [p for p in pairs if p.longest <= batching.max_length]
    metrics.add("skipped_too_long", len(pairs) - len(kept), 1)
    micro = micro_batches(kept, batching.micro_batch_tokens, batching.padding_free)
    count = torch.tensor([len(micro)], device=batching.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank joins, with its own count
    return [(batch, True) for batch in micro] + [([filler.cut_to_one_token()], False)] * (int(count) - len(micro))


def add_pair_metrics(metrics: MetricWindow, losses: torch.Tensor, values: dict, num_pairs: int, real: bool) -> None:
    """The loss and the objective's metrics summed over the pairs; a dummy micro-batch adds only their names, with
    nothing to count, because every rank must reduce the same names even where all its forwards were dummies."""
    metrics.add("loss", losses.sum() if real else 0.0, num_pairs if real else 0)
    for name, value in values.items():
        metrics.add(name, value.sum() if real else 0.0, num_pairs if real else 0)


@dataclass
class StepResult:
    grad_norm: torch.Tensor
    finite: bool  # on every rank: the loss of every pair and the gradient norm
    tokens: int  # real tokens this rank forwarded
    learning: int  # pairs of the global batch (every rank's) that the objective learns from
    first_loss: float  # the mean loss of this rank's first micro-batch, before the update
    transport_failed: int = 0  # pairs of the global batch whose OTPO weights POT could not compute (losses.py)


def train_step(objective: Objective, micro: list[tuple[list[TrainingPair], bool]], batching: Batching,
               global_batch_size: int, max_grad_norm: float, metrics: MetricWindow) -> StepResult:
    """Forward and backward of this rank's micro-batches (`rank_micro_batches`) of one global batch, gradients
    clipped; the update is the caller's, once it has seen that everything was finite."""
    world_size = dist.get_world_size()
    # Summed over the ranks in one collective: pairs whose loss is not finite, pairs the objective learns from, pairs
    # whose OTPO transport is not finite.
    counts, tokens, first_loss = torch.zeros(3, device=batching.device), 0, math.nan
    for index, (batch, real) in enumerate(micro):
        inputs = batching.inputs(batch)
        objective.policy.set_requires_gradient_sync(index == len(micro) - 1)  # reduce-scatter on the last only
        losses, values = objective.losses(inputs)
        # Sum over the global batch / its size; FSDP averages gradients over ranks, so scale by world size.
        (losses.sum() * (world_size / global_batch_size if real else 0.0)).backward()
        if real:
            counts[0] += (~torch.isfinite(losses.detach())).sum()
            counts[1] += inputs.num_pairs - values.get("skipped_zero_weights", torch.zeros(())).sum()
            counts[2] += values.get("otpo_not_finite", torch.zeros(())).sum()
            tokens += inputs.num_tokens
            first_loss = float(losses.detach().mean()) if index == 0 else first_loss
        add_pair_metrics(metrics, losses.detach(), values, inputs.num_pairs, real)
    trainable = [p for p in objective.policy.parameters() if p.requires_grad]
    # --max-grad-norm 0 means no clipping, as in transformers and TRL: the norm is still measured and checked.
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    dist.all_reduce(counts)  # every rank decides alike
    not_finite, learning, transport_failed = counts.tolist()
    return StepResult(grad_norm, not_finite == 0 and bool(torch.isfinite(grad_norm)), tokens, round(learning),
                      first_loss, round(transport_failed))


def evaluate(objective: Objective, reader: EvalReader, batching: Batching, chunk_size: int) -> dict[str, float]:
    """The objective's metrics over every held-out pair, means over all pairs and ranks. The pairs go by chunks
    of `chunk_size`, each rank forwarding its share as in training. Nothing of training changes: no gradient,
    no random number drawn (dropout off), the data stream untouched, the modules' modes restored."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    metrics = MetricWindow()
    with without_training(objective.policy):
        coordinates = reader.coordinates()
        while chunk := list(itertools.islice(coordinates, chunk_size)):
            mine = [reader.read(*c) for c in rank_slice(chunk, rank, world_size)]
            filler = mine[0] if mine else reader.read(*chunk[0])  # a rank with no pair left repeats the first
            for batch, real in rank_micro_batches(mine, filler, batching, metrics):
                inputs = batching.inputs(batch)
                losses, values = objective.losses(inputs)
                add_pair_metrics(metrics, losses, values, inputs.num_pairs, real)
    return metrics.reduce(batching.device)


# A run has blown up, though every number is finite, when the weights' root mean square has grown this many times
# over from the run's start (fine-tuning at any sane learning rate moves it by a few per cent), or the loss on the
# start's first micro-batch has grown this many times over from its value before the first update (or from 1).
RMS_GROWTH, LOSS_GROWTH = 10.0, 100.0


@dataclass
class Start:
    """What the weights gave at the start of this process's training, to compare with later."""

    rms: float  # root mean square of every weight, over every rank
    probe: list[TrainingPair]  # this rank's first micro-batch
    probe_loss: float  # its mean loss before the first update


def weights_rms(policy: torch.nn.Module, device: torch.device) -> float:
    """The root mean square of every weight of the policy (frozen ones too), over every rank's shards; not
    finite when a weight is not."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for parameter in policy.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        sums[0] += local.detach().double().square().sum()
        sums[1] += local.numel()
    dist.all_reduce(sums)
    return math.sqrt(sums[0] / sums[1]) if sums[1] else 0.0


def weights_problem(objective: Objective, batching: Batching, start: Start) -> str | None:
    """None when the weights can be written; else what is wrong with them, alike on every rank: a weight not
    finite, a finite update that overflows in the forward (a learning rate of 1e9), or one that blew the weights
    or the loss on the start's probe up (RMS_GROWTH, LOSS_GROWTH; a learning rate of 1e8, all finite)."""
    with without_training(objective.policy):
        rms = weights_rms(objective.policy, batching.device)
        losses, _ = objective.losses(batching.inputs(start.probe))
    loss = float(losses.mean())
    flags = torch.tensor([not math.isfinite(loss), loss > LOSS_GROWTH * max(abs(start.probe_loss), 1.0)],
                         dtype=torch.float64, device=batching.device)
    dist.all_reduce(flags)  # every rank decides alike
    if not math.isfinite(rms) or flags[0]:
        return "are not finite, or give a loss that is not finite"
    if rms > RMS_GROWTH * start.rms:
        return (f"have blown up: their root mean square grew from {start.rms:.3g} to {rms:.3g} "
                f"(more than {RMS_GROWTH:g}x)")
    if flags[1]:
        return (f"have blown up: the loss on the run's first micro-batch grew more than {LOSS_GROWTH:g}x "
                f"(from {start.probe_loss:.3g} to {loss:.3g})")
    return None


@contextlib.contextmanager
def without_training(policy: torch.nn.Module):
    """No gradient and no random number drawn (dropout off), the modules' modes restored after; then the gathered
    weights freed, which the root keeps after a forward without backward."""
    modes = {module: module.training for module in policy.modules()}
    policy.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training
    policy.reshard()
