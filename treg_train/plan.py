"""The memory a run needs on each device, worked out from the model's config and the settings alone,
before any weight or data is loaded, and the activation checkpointing that makes it fit.

Parts of the peak (per device, GiB):
- parameters: every weight in fp32 (the master copy), sharded over the processes (whole under no_shard);
- gradients and optimizer: fp32 gradients and AdamW's two moments of the trainable weights, sharded (whole
  under no_shard);
- gathered layers: FSDP2's unsharded copies in the compute dtype: the root (embeddings, output layer)
  for the whole step, two decoder layers (one computing, one prefetched), and one layer's gradients; under
  shard_grad_op every decoder layer's, kept from its forward to its backward; under no_shard FSDP2 still copies
  each layer into its unsharded buffer as it computes, so the same as full_shard;
- activations: what a forward of `tokens` tokens keeps for its backward (ACTIVATION_BYTES, per token
  and decoder layer), less what checkpointing recomputes; `tokens` is the longest forward the data's lengths
  can make (`longest_forward`), or without the data a full one (`tokens_per_forward`);
- log-prob chunk: one chunk of output-layer rows in fp32 (no more than a forward's response tokens, where the
  data's lengths are known), with its temporaries and gradient (and the reference's
  logits and log-probs of the same rows, where TDPO's exact KL reads them; the policy's log-probs over the
  vocabulary outside the reference's top K, where TDPO's KL reads the shards' top-K);
- reference model (--ref-model): its fp32 weights, sharded, and its gathered layers (the output layer whole, for
  TDPO's exact KL);
- on a CPU the whole process counts (peak RSS): the process itself, and rank 0 holding a full fp32
  copy of the checkpoint while it scatters the shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from treg_train.objectives import method

GIB = 2**30
MODES = ("none", "every other layer", "every layer")  # what auto tries, in order
# What --sharding auto tries on a CPU (gloo), in order: shard_grad_op gathers each layer once a step, full_shard
# twice; no_shard measured slower and larger than shard_grad_op, as its all-reduce of whole fp32 gradients costs more
# over gloo than the gathers it saves (docs/BENCHMARKS.md).
AUTO_SHARDINGS = ("shard_grad_op", "full_shard")
ONE_PROCESS = "one process"
FIT_SHARE = 0.85  # of the device's memory, the most a plan may take

# Bytes kept for the backward per token and decoder layer, by architecture and compute dtype: coefficients of
# (hidden, intermediate, 2 x kv heads x head dim, attention heads, 1). Measured by counting the storages a layer
# saves for its backward (`pipelines/bench/memory_plan.py --calibrate`), attention by sdpa/flex (no [L, L] matrix).
ACTIVATION_BYTES = {
    ("llama", "float32"): (32.05, 16.0, 4.0, 0.5, 520.0),
    ("llama", "bfloat16"): (20.06, 8.0, 2.0, 0.31, 264.0),
    ("gemma2", "float32"): (48.05, 16.0, 4.0, 0.75, 528.0),
    ("gemma2", "bfloat16"): (40.05, 8.0, 2.0, 0.63, 272.0),
}
LAYER_FAMILY = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "gemma2": "gemma2"}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, counted on the meta device (no memory)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # 2 x key-value heads x head dim
    vocab: int
    total_params: int
    trainable_params: int
    layer_params: int  # one decoder layer

    @classmethod
    def of(cls, lm: torch.nn.Module, layers: list[torch.nn.Module]) -> ModelShape:
        config = lm.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return cls(config.model_type, len(layers), config.hidden_size, intermediate or 4 * config.hidden_size,
                   config.num_attention_heads, 2 * kv_heads * head_dim, config.vocab_size,
                   sum(p.numel() for p in lm.parameters()),
                   sum(p.numel() for p in lm.parameters() if p.requires_grad),
                   sum(p.numel() for p in layers[0].parameters()))


@dataclass(frozen=True)
class Budget:
    """How a run uses a device: processes, precision, tokens per forward, checkpointing."""

    world_size: int
    compute_dtype: torch.dtype
    tokens: int  # the most tokens one forward holds
    chunk_rows: int
    device_type: str
    checkpointing: str = "none"  # one of MODES
    sharding: str = "full_shard"  # a --sharding but auto, or ONE_PROCESS
    reference: bool = False  # --ref-model: a frozen model of the same size, sharded too
    reference_distribution: bool = False  # its whole distribution beside the policy's, chunk by chunk (TDPO)
    reference_topk: bool = False  # the shards' top-K of the reference beside the policy's rows (TDPO without it)
    from_data: bool = False  # `tokens` from the data's lengths; else a full forward, the settings' worst case


@dataclass(frozen=True)
class MemoryPlan:
    parts: dict[str, float]  # GiB
    checkpointing: str
    tokens: int = 0  # of the longest forward planned
    from_data: bool = False  # that forward from the data's lengths, not the settings' worst case
    sharding: str = "full_shard"  # a --sharding but auto, or ONE_PROCESS

    @property
    def peak_memory_gb(self) -> float:
        return sum(self.parts.values())

    @property
    def forwards(self) -> str:
        """What the activations were planned for."""
        if self.from_data:
            return f"forwards of at most {self.tokens} tokens, from the data's lengths"
        return f"assumes full forwards of {self.tokens} tokens: give --data to plan from the data's lengths"

    def line(self) -> str:
        shown = ", ".join(f"{name} {gb:.2f}" for name, gb in self.parts.items() if gb >= 0.005)
        return (f"memory plan: {self.peak_memory_gb:.2f} GB per device ({shown}; sharding: {self.sharding}; "
                f"checkpointing: {self.checkpointing}; {self.forwards})")

    def table(self) -> str:
        rows = [f"  {name:<22} {gb:10.2f} GB" for name, gb in self.parts.items()]
        return "\n".join(["memory plan, per device:", *rows, f"  {'peak':<22} {self.peak_memory_gb:10.2f} GB",
                          f"  checkpointing: {self.checkpointing}", f"  sharding: {self.sharding}",
                          f"  {self.forwards}"])

    def json(self) -> str:
        return json.dumps({"peak_memory_gb": round(self.peak_memory_gb, 3), "checkpointing": self.checkpointing,
                           "sharding": self.sharding, "forward_tokens": self.tokens, "from_data": self.from_data,
                           "parts": {k: round(v, 3) for k, v in self.parts.items()}})


def activation_bytes_per_token(shape: ModelShape, dtype: torch.dtype, checkpointing: str) -> float:
    """What a forward keeps for its backward per token at the backward's start, and what the backward adds:
    each decoder layer kept whole or, where checkpointed, only its input; one layer's worth of gradients in
    flight; a recomputed layer where the last layer is checkpointed (the others recompute once later layers
    have been freed); and the head (final norm, response hidden states)."""
    name = str(dtype).removeprefix("torch.")
    coefficients = ACTIVATION_BYTES[(LAYER_FAMILY.get(shape.model_type, "llama"), name if name == "float32"
                                     else "bfloat16")]
    layer = sum(c * d for c, d in zip(coefficients, (shape.hidden, shape.intermediate, shape.kv_dim, shape.heads, 1)))
    checkpointed = {"none": set(), "every other layer": set(range(0, shape.layers, 2)),
                    "every layer": set(range(shape.layers))}[checkpointing]
    kept = (shape.layers - len(checkpointed)) * layer + len(checkpointed) * dtype.itemsize * shape.hidden
    recompute = layer if shape.layers - 1 in checkpointed else 0.0
    head = (4 + 2 * dtype.itemsize) * shape.hidden
    return kept + layer + recompute + head


def plan(shape: ModelShape, budget: Budget, process_gb: float = 0.0) -> MemoryPlan:
    """The expected per-device peak; `process_gb` is the process's own resident memory before loading (CPU)."""
    width = budget.compute_dtype.itemsize
    world = 1 if budget.sharding == "no_shard" else budget.world_size  # the shards of each weight
    held = shape.layers if budget.sharding == "shard_grad_op" else 2  # decoder layers gathered at once
    root = shape.total_params - shape.layers * shape.layer_params
    trained = shape.trainable_params / max(shape.total_params, 1)
    # TDPO's KL, per entry of a chunk: the reference's logits and log-probs beside the policy's, or (top-K) the
    # policy's log-probs with the K masked out
    kl_bytes = 8 if budget.reference_distribution else 4 if budget.reference_topk else 0
    parts = {
        "parameters": shape.total_params * 4 / world,
        "gradients": shape.trainable_params * 4 / world,
        "optimizer": shape.trainable_params * 8 / world,
        "gathered layers": (root * (1 + trained) + shape.layer_params * (held + trained)) * width,
        "activations": activation_bytes_per_token(shape, budget.compute_dtype, budget.checkpointing) * budget.tokens,
        "log-prob chunk": budget.chunk_rows * shape.vocab * (12 + width + kl_bytes),
        "reference model": (shape.total_params * 4 / world + (root + 2 * shape.layer_params) * width
                            if budget.reference else 0.0),
        "process and loading": 0.0,
    }
    if budget.device_type == "cpu":  # peak RSS: the process, and rank 0's full copy of the checkpoint while loading
        loading = loading_bytes(shape, world)
        training = sum(parts.values())
        parts["process and loading"] = process_gb * GIB + max(0.0, loading - training)
    return MemoryPlan({name: value / GIB for name, value in parts.items()}, budget.checkpointing, budget.tokens,
                      budget.from_data, budget.sharding)


def loading_bytes(shape: ModelShape, world_size: int) -> float:
    """Rank 0 while it loads on a CPU: the full fp32 checkpoint as read, and its own shards."""
    return shape.total_params * 8 + shape.total_params * 4 / world_size


def device_memory_gb(device: torch.device) -> float:
    """What one process may use: the GPU's total, or on a CPU the memory available now shared by the processes
    of this machine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    available = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable")),
                     0)
    return available / GIB / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def process_memory_gb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def model_shape(config) -> ModelShape:
    """The policy's shape for these settings (LoRA's adapters included), counted on the meta device."""
    from treg_train.lora import LoraSettings, add_adapters
    from treg_train.model import decoder_layers, empty_causal_lm

    lm = empty_causal_lm(config.model, config.attn_implementation, what="--model")
    lora = LoraSettings.of(config)
    if lora is not None:
        lm = add_adapters(lm, lora, config.model)
    return ModelShape.of(lm, decoder_layers(lm))


def tokens_per_forward(config, world_size: int) -> int:
    """The most tokens one forward holds whatever the data: --micro-batch-tokens, or a process's share of the global
    batch at --max-length if less."""
    return min(config.micro_batch_tokens, config.global_batch_size // world_size * 2 * config.max_length)


def longest_forward(lengths: np.ndarray, max_length: int, max_tokens: int, pairs_per_rank: int,
                    padding_free: bool) -> int:
    """The most tokens one forward can hold when the collator (collate.micro_batches) cuts a rank's share of a
    global batch, `pairs_per_rank` of these pairs, into micro-batches of at most `max_tokens` tokens. `lengths`
    holds each pair's (prompt, chosen, rejected) token counts, [pairs, 3]; pairs longer than `max_length` are
    skipped, as training skips them. Packed: the longest pairs' [chosen; rejected] tokens together, up to
    `max_tokens` (a bound: the packer may stop short of it by less than a pair). Padded: 2 x pairs x the longest
    sequence among them, for each pair with as many pairs no longer than it as fit."""
    prompt, chosen, rejected = np.asarray(lengths, dtype=np.int64).reshape(-1, 3).T
    longest = prompt + np.maximum(chosen, rejected)
    kept = longest <= max_length
    if not kept.any():
        return 0
    if padding_free:
        tokens = np.sort((2 * prompt + chosen + rejected)[kept])[::-1]
        return int(max(tokens[0], min(max_tokens, tokens[:pairs_per_rank].sum())))  # one pair is never cut
    longest = np.sort(longest[kept])
    no_longer = np.arange(1, len(longest) + 1)  # pairs no longer than each (ties: at least)
    fitting = np.maximum(1, max_tokens // np.maximum(2 * longest, 1))
    pairs = np.minimum(np.minimum(no_longer, pairs_per_rank), fitting)
    return int((2 * pairs * longest).max())


def most_response_tokens(lengths: np.ndarray, max_length: int, pairs_per_rank: int) -> int:
    """The most response tokens one forward can predict, the rows the log-prob kernel chunks: those of the
    `pairs_per_rank` pairs (no longer than `max_length`) with the most."""
    prompt, chosen, rejected = np.asarray(lengths, dtype=np.int64).reshape(-1, 3).T
    responses = (chosen + rejected)[prompt + np.maximum(chosen, rejected) <= max_length]
    return int(np.sort(responses)[::-1][:pairs_per_rank].sum())


def packs_pairs(config, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the run will pack its pairs without padding, decided as train.py decides it: --padding-free, else
    whether the attention it will run is variable-length (model.use_padding_free)."""
    from treg_core.attention import VARLEN_IMPLEMENTATIONS, default_attention
    from treg_core.sources import load_model_config

    if config.padding_free is not None:
        return config.padding_free
    attention = config.attn_implementation or default_attention(load_model_config(config.model, "--model"), device,
                                                                 dtype)[0]
    return attention in VARLEN_IMPLEMENTATIONS


@dataclass
class Planner:
    """Plans on one device for these settings or changed ones, so the advice can say what a change would give."""

    device_type: str
    compute_dtype: torch.dtype
    process_gb: float  # the process's own resident memory (CPU)
    lengths: np.ndarray | None = None  # the training pairs' (prompt, chosen, rejected) token counts; None: unknown
    padding_free: bool = True  # how the run batches them (packs_pairs)
    shapes: dict[int, ModelShape] = field(default_factory=dict)  # by --lora-r

    def shape(self, config) -> ModelShape:
        if config.lora_r not in self.shapes:
            self.shapes[config.lora_r] = model_shape(config)
        return self.shapes[config.lora_r]

    def tokens(self, config, world_size: int) -> int:
        """The most tokens one forward holds: from the data's lengths where known, else a full forward."""
        if self.lengths is None:
            return tokens_per_forward(config, world_size)
        tokens = longest_forward(self.lengths, config.max_length, config.micro_batch_tokens,
                                 config.global_batch_size // world_size, self.padding_free)
        if self.padding_free and config.attn_implementation == "flex_attention":  # packs padded to a few lengths
            from treg_train.step import pack_lengths

            tokens = next((n for n in pack_lengths(config.micro_batch_tokens) if n >= tokens), tokens)
        return tokens

    def chunk_rows(self, config, world_size: int) -> int:
        """The log-prob kernel's rows at a time: --logprob-chunk-rows, or the response tokens of a forward if fewer."""
        if self.lengths is None:
            return config.logprob_chunk_rows
        responses = most_response_tokens(self.lengths, config.max_length, config.global_batch_size // world_size)
        return min(config.logprob_chunk_rows, responses, self.tokens(config, world_size))

    def plans(self, config, world_size: int, sharding: str | None = None) -> dict[str, MemoryPlan]:
        """A plan for each checkpointing mode, under `sharding` (default: the least memory the settings allow)."""
        kl = method(config.loss).needs_reference_distribution
        sharding = sharding or shardings(config, world_size, self.device_type)[-1]
        budget = Budget(world_size, self.compute_dtype, self.tokens(config, world_size),
                        self.chunk_rows(config, world_size), self.device_type, sharding=sharding,
                        reference=bool(config.ref_model),
                        reference_distribution=kl and bool(config.ref_model),
                        reference_topk=kl and not config.ref_model, from_data=self.lengths is not None)
        return {mode: plan(self.shape(config), replace(budget, checkpointing=mode), self.process_gb) for mode in MODES}

    def least(self, config, world_size: int) -> MemoryPlan:
        """The smallest plan the settings allow: --gradient-checkpointing's own mode, or under auto every layer."""
        from treg_train.config import CHECKPOINTING

        return self.plans(config, world_size)[CHECKPOINTING[config.gradient_checkpointing] or MODES[-1]]

    def loading_gb(self, config, world_size: int) -> float:
        """What rank 0 holds while it loads the checkpoint on a CPU, the process included; 0 on a GPU."""
        if self.device_type != "cpu":
            return 0.0
        return self.process_gb + loading_bytes(self.shape(config), world_size) / GIB


def shardings(config, world_size: int, device_type: str) -> tuple[str, ...]:
    """The shardings the run may use, in the order --sharding auto prefers them: one process has nothing to shard;
    --sharding names one; auto on a CPU (gloo) tries AUTO_SHARDINGS, on GPUs keeps full_shard (the others are not
    measured there)."""
    if world_size == 1:
        return (ONE_PROCESS,)
    if config.sharding != "auto":
        return (config.sharding,)
    return AUTO_SHARDINGS if device_type == "cpu" else ("full_shard",)


def with_checkpointing(mode: str) -> str:
    return "without activation checkpointing" if mode == "none" else f"with activation checkpointing on {mode}"


def plan_run(config, world_size: int, device: torch.device, compute_dtype: torch.dtype, strict: bool = True,
             lengths: np.ndarray | None = None) -> tuple[MemoryPlan, str | None]:
    """The plan for these settings and the checkpointing they ask for; with --gradient-checkpointing auto, the
    least checkpointing that fits 85% of the device (and a line saying why, when it is not none); with --sharding
    auto, the first of `shardings` under which that fits. `lengths`: the training pairs' token counts
    (ShardIndex.pair_lengths), for forwards as long as the data makes them; without them, full ones. When nothing
    fits: a UserError, or without `strict` the smallest plan the settings allow and a line saying it does not fit and
    what would."""
    from treg_train.config import CHECKPOINTING

    planner = Planner(device.type, compute_dtype, process_memory_gb() if device.type == "cpu" else 0.0, lengths,
                      lengths is None or packs_pairs(config, device, compute_dtype))
    available = device_memory_gb(device)
    requested = CHECKPOINTING[config.gradient_checkpointing]
    for sharding in shardings(config, world_size, device.type):  # the last is the least memory: kept if none fits
        plans = planner.plans(config, world_size, sharding)
        fitting = [mode for mode in MODES if plans[mode].peak_memory_gb <= FIT_SHARE * available]
        if requested in fitting or (requested is None and fitting):
            break
    if not fitting:
        return does_not_fit(planner, config, world_size, available, strict)
    if requested is not None:
        note = None if requested in fitting else (
            f"warning: {with_checkpointing(requested)} the plan needs {plans[requested].peak_memory_gb:.1f} GB, more "
            f"than {FIT_SHARE:.0%} of the {available:.1f} GB of this device; --gradient-checkpointing auto would "
            f"checkpoint {fitting[0]}")
        return plans[requested], note
    chosen = fitting[0]
    note = None if chosen == "none" else (
        f"activation checkpointing on {chosen}: without it the plan needs {plans['none'].peak_memory_gb:.1f} GB, "
        f"more than {FIT_SHARE:.0%} of the {available:.1f} GB of this device (--gradient-checkpointing auto)")
    return plans[chosen], note


def does_not_fit(planner: Planner, config, world_size: int, available: float,
                 strict: bool) -> tuple[MemoryPlan, str]:
    """The smallest plan the settings allow and a line saying what would make the run fit; a UserError if `strict`."""
    from treg_core.errors import UserError
    from treg_train.config import CHECKPOINTING

    least = planner.least(config, world_size)
    how = (f"even with activation checkpointing on {least.checkpointing}"
           if CHECKPOINTING[config.gradient_checkpointing] is None else with_checkpointing(least.checkpointing))
    problem = (f"the run needs {least.peak_memory_gb:.1f} GB per device {how}, more than {FIT_SHARE:.0%} of the "
               f"{available:.1f} GB this device has; {advice(planner, config, world_size, FIT_SHARE * available)}")
    if strict:
        raise UserError(problem)
    return least, problem


# A change the advice may suggest: its words, the settings it changes, and the number of processes.
Change = tuple[str, dict, int]


def advice(planner: Planner, config, world_size: int, limit: float) -> str:
    """What would bring the peak under `limit` GB: each change of one setting that would alone, else what each
    lowers it to. Never a setting the run already has, nor one that cannot lower the peak."""
    loading = planner.loading_gb(config, world_size)
    if loading > limit:
        return (f"rank 0 holds a full fp32 copy of the checkpoint while it loads the model on a CPU ({loading:.1f} GB "
                "with the process), which neither checkpointing, --micro-batch-tokens, LoRA nor more processes lower; "
                "use a machine with more memory, GPUs (which leave that copy in host memory), or a smaller --model")
    peak = planner.least(config, world_size).peak_memory_gb

    def gives(change: Change) -> float:
        _, settings, processes = change
        return planner.least(replace(config, **settings), processes).peak_memory_gb

    chosen = []  # of each kind of change, the least that fits, or else the one that lowers the peak most
    for changes in (fewer_tokens(config, planner.tokens(config, world_size), world_size),
                    more_checkpointing(config, world_size), more_sharding(config, world_size),
                    lora_adapters(config, world_size), more_processes(config, world_size, planner.device_type)):
        peaks = [(change, gives(change)) for change in changes]
        fitting = [(change, gb) for change, gb in peaks if gb <= limit]
        best = fitting[0] if fitting else min(peaks, key=lambda pair: pair[1], default=None)
        if best and best[1] < 0.99 * peak:  # a change that lowers the peak by less cannot help
            chosen.append(best)
    fits = [change[0] for change, gb in chosen if gb <= limit]
    if fits:
        return ", or ".join(fits)
    if not chosen:
        return "no setting lowers it: use a device with more memory, or a smaller --model"
    apart = "; ".join(f"{change[0]} gives {gb:.1f} GB" for change, gb in chosen)
    together = gives(("", {k: v for change, _ in chosen for k, v in change[1].items()},
                          max(change[2] for change, _ in chosen)))
    return (f"no one change fits: {apart}; " + ("together they fit" if together <= limit else
            f"together they need {together:.1f} GB: use a device with more memory, or a smaller --model"))


def fewer_tokens(config, now: int, world_size: int) -> list[Change]:
    """--micro-batch-tokens halved from the `now` tokens of the longest forward, down to one pair of --max-length
    (the least it may be)."""
    least = 2 * config.max_length
    values = [now // 2**k for k in range(1, 64) if now // 2**k > least] + ([least] if now > least else [])
    return [(f"lower --micro-batch-tokens to {v} (now {config.micro_batch_tokens})", {"micro_batch_tokens": v},
             world_size) for v in values]


def more_checkpointing(config, world_size: int) -> list[Change]:
    """--gradient-checkpointing true where the settings asked for less (auto already tries it)."""
    if config.gradient_checkpointing in ("auto", "true"):
        return []
    return [(f"--gradient-checkpointing true (now {config.gradient_checkpointing})",
             {"gradient_checkpointing": "true"}, world_size)]


def more_sharding(config, world_size: int) -> list[Change]:
    """--sharding full_shard where the settings asked for less (auto already tries it), on several processes."""
    if world_size == 1 or config.sharding in ("auto", "full_shard"):
        return []
    return [(f"--sharding full_shard (now {config.sharding})", {"sharding": "full_shard"}, world_size)]


def lora_adapters(config, world_size: int) -> list[Change]:
    if config.lora_r:
        return []
    return [("train LoRA adapters (--lora-r 16)", {"lora_r": 16}, world_size)]


def more_processes(config, world_size: int, device_type: str) -> list[Change]:
    """More processes, each with a device of its own, that divide --global-batch-size."""
    where = " on more machines" if device_type == "cpu" else ""  # a machine's processes share its memory
    return [(f"run {n} processes (now {world_size}){where}", {}, n)
            for n in range(world_size + 1, config.global_batch_size + 1) if config.global_batch_size % n == 0]
