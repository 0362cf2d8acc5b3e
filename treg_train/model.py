"""The policy (treg_core.forward.TokenLogprobs: log-probs of the response tokens only), its FSDP2
sharding (fully_shard per decoder layer, then the root; --sharding says what is split), and loading it so
that a node holds one full copy of the checkpoint, not one per process. What changes speed and memory but not
the numbers (activation checkpointing, regional compilation, Liger's kernels) is applied to the meta-device
model before sharding, as FSDP2 wants it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from treg_core.attention import VARLEN, VARLEN_IMPLEMENTATIONS, register
from treg_core.errors import UserError
from treg_core.forward import TokenLogprobs
from treg_core.sources import load_model_config
from treg_train.collectives import use_pairwise_collectives
from treg_train.lora import LoraSettings, add_adapters, checkpoint_key, initial_adapter_weights


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if attn_implementation == VARLEN:
        register()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def empty_causal_lm(path: str, attn_implementation: str | None = None, what: str = "") -> nn.Module:
    """The architecture of `path` with parameters on the meta device (no memory) and real buffers
    (rotary frequencies and the like are computed in __init__ and are not in the checkpoint); `what` names the
    model in the one line said when its config cannot be read ("--model")."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if attn_implementation == VARLEN:
        register()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(load_model_config(path, what), dtype=torch.float32, **kwargs)
    lm.tie_weights()  # the empty-weights context unties them (Gemma-2 ties its embeddings)
    return lm


@dataclass(frozen=True)
class PolicyOptions:
    """How the policy runs: attention kernel, log-prob chunk, and what trades compute for memory or speed."""

    attn_implementation: str | None = None
    chunk_rows: int = 1024
    checkpointing: str = "none"  # "none", "every other layer" or "every layer" (treg_train.plan.MODES)
    compile: bool = False  # regional: each decoder layer
    liger: bool = False  # liger-kernel's fused layers (CUDA)
    sharding: str = "full_shard"  # a --sharding but auto (or plan.ONE_PROCESS: full_shard over one)


def load_sharded(path: str, mesh, param_dtype: torch.dtype | None, options: PolicyOptions = PolicyOptions(), *,
                 trainable: bool = True, lora: LoraSettings | None = None,
                 whole_output_layer: bool = False) -> TokenLogprobs:
    """Every rank builds the model on the meta device and shards it; rank 0 alone reads the
    checkpoint (fp32 master weights) and scatters the shards. Host memory: one full copy on rank 0,
    each rank's own shards elsewhere; the result equals loading the checkpoint on every rank.
    With `lora`, adapters are injected before sharding (one FSDP unit holds a layer's frozen weights and its
    adapters); rank 0 draws their first values and scatters them like the checkpoint's. With `whole_output_layer`
    (a frozen reference whose distribution TDPO's KL reads beside the policy's, chunk by chunk, in the policy's
    backward too), the output layer is left unsharded: a whole copy on every rank, in the compute precision."""
    import torch.distributed as dist

    # A frozen model has no backward to keep its layers gathered for: whole (no_shard) or sharded fully.
    frozen = PolicyOptions(options.attn_implementation, options.chunk_rows, liger=options.liger,
                           sharding="no_shard" if options.sharding == "no_shard" else "full_shard")
    lm = prepare_layers(empty_causal_lm(path, options.attn_implementation), options if trainable else frozen)
    if lora is not None:
        lm = add_adapters(lm, lora, path)
    model = shard_model(TokenLogprobs(lm, options.chunk_rows), mesh, param_dtype, trainable,
                        whole={lm.get_output_embeddings().weight} if whole_output_layer else None,
                        sharding=(options if trainable else frozen).sharding)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=mesh.device_type)
    full = {}
    if dist.get_rank() == 0:
        full = {f"lm.{key}": value
                for key, value in load_causal_lm(path, torch.float32, options.attn_implementation).state_dict().items()}
        if lora is not None:
            full.update(initial_adapter_weights(model, lora.seed))
    saved_buffers = [[name for name in buffers if name in full]]  # the rest are computed in __init__
    dist.broadcast_object_list(saved_buffers, src=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if isinstance(parameter, DTensor) and split(parameter):
                scatter_rows(full.get(checkpoint_key(name)), parameter.to_local(), parameter.shape)
            elif isinstance(parameter, DTensor):  # replicated (no_shard): every rank holds all of it
                if dist.get_rank() == 0:
                    parameter.to_local().copy_(full[checkpoint_key(name)])
                dist.broadcast(parameter.to_local(), src=0)
            else:  # left whole by FSDP: every rank holds all of it
                if dist.get_rank() == 0:
                    parameter.copy_(full[checkpoint_key(name)])
                dist.broadcast(parameter, src=0)
                parameter.data = parameter.data.to(param_dtype or parameter.dtype)
        for name, buffer in model.named_buffers():
            buffer.copy_(full[name] if name in full else buffers[name])
            if name in saved_buffers[0]:
                dist.broadcast(buffer, src=0)
    return model


def split(parameter: DTensor) -> bool:
    """Whether the processes hold different parts of a parameter (not under no_shard, nor in a world of one)."""
    return any(placement.is_shard() and size > 1
               for placement, size in zip(parameter.placements, parameter.device_mesh.shape))


def prepare_layers(lm: nn.Module, options: PolicyOptions) -> nn.Module:
    """Liger's kernels, activation checkpointing and compilation, on the meta-device model."""
    if options.liger:
        apply_liger_kernel(lm)
    layers = decoder_layers(lm)
    if options.checkpointing != "none":
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if options.checkpointing == "every other layer":  # layers 0, 2, 4, ... recompute; the others keep theirs
            for layer in layers[1::2]:
                layer.gradient_checkpointing = False
    if options.compile:
        for layer in layers:  # in place: the layer keeps its class and parameter names, which FSDP2 and loading use
            layer.compile()
    return lm


def apply_liger_kernel(lm: nn.Module) -> None:
    """liger-kernel's RMSNorm, SwiGLU/GeGLU and rotary kernels in place of the layers' own. Its fused output layer
    and loss stay off: treg computes the response tokens' log-probs itself."""
    if not torch.cuda.is_available():  # first: installing the package would not help
        raise UserError("--use-liger-kernel runs on CUDA only (Triton kernels); leave it off on this machine")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError("--use-liger-kernel needs liger-kernel: pip install liger-kernel") from None
    _apply_liger_kernel_to_instance(model=lm, fused_linear_cross_entropy=False, cross_entropy=False)


def scatter_rows(full: torch.Tensor | None, local: torch.Tensor, shape: torch.Size) -> None:
    """FSDP2 shards dim 0 as torch.chunk does: rank r holds rows [r*c, (r+1)*c), c = ceil(n / ranks).
    Rank 0 sends each rank exactly its rows (padded to c), so no rank ever holds another's."""
    import torch.distributed as dist

    ranks = dist.get_world_size()
    rows = -(-shape[0] // ranks)
    whole = local.shape[0] == rows and local.is_contiguous()  # receive in place, no extra copy
    buffer = local if whole else local.new_empty((rows, *shape[1:]))
    chunks = None
    if dist.get_rank() == 0:
        padded = full.new_zeros((rows * ranks, *shape[1:]))
        padded[: shape[0]] = full
        chunks = [chunk.to(local) for chunk in padded.chunk(ranks)]
    dist.scatter(buffer, chunks, src=0)
    if not whole:
        local.copy_(buffer[: local.shape[0]])


def use_padding_free(lm: nn.Module, requested: bool | None) -> bool:
    """Packing pays where attention is variable-length; with a mask it costs [tokens, tokens]."""
    if requested is not None:
        return requested
    return getattr(lm.config, "_attn_implementation", None) in VARLEN_IMPLEMENTATIONS


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks, found by the class names transformers lists as not-to-be-split."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"cannot find the decoder layers of {type(lm).__name__} (its _no_split_modules names none), "
                        "so treg-train cannot shard it; use a transformers causal LM that lists them")
    return layers


def shard_model(model: TokenLogprobs, mesh, param_dtype: torch.dtype | None, trainable: bool = True,
                whole: set | None = None, sharding: str = "full_shard") -> TokenLogprobs:
    """FSDP2: each decoder layer is a unit, the root holds embeddings, final norm and lm_head (but the parameters
    `whole`, which it leaves unsharded). Mixed precision computes in `param_dtype` and reduces gradients in fp32.
    shard_grad_op keeps each layer gathered from its forward to its backward (one all-gather a step, not two);
    no_shard is HSDP over `mesh` (state.Runtime.mesh_for: replicated over the processes, a shard of one), whose
    gradients are all-reduced once a step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
              else MixedPrecisionPolicy())
    # FSDP2's own order of all-gathers: explicit prefetching (set_modules_to_forward_prefetch) made gloo runs slower.
    for layer in decoder_layers(model.lm):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=sharding != "shard_grad_op")
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=whole)
    if mesh.ndim == 1 and mesh.size() > 1 and dist.get_backend(mesh.get_group()) == "gloo":
        use_pairwise_collectives(model)  # faster over gloo than its own (treg_train.collectives)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
