"""LoRA through peft, under FSDP2: adapters injected into the meta-device model before sharding, their
first values, the names the checkpoint's weights take once wrapped, and the two exports (the merged
model, and the adapter alone in peft's format).

The reference needs no second model: its log-probs come from the shards, so a LoRA run holds the
frozen base weights once, plus the adapters and their optimizer state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from treg_core.atomic import replacing
from treg_core.errors import UserError, first_line

ADAPTER = "default"  # peft's adapter name; the exported adapter's keys drop it, as peft's own save does


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: str  # "all-linear" or comma-separated module names
    seed: int  # of the adapters' first values (A), drawn on rank 0 alone

    @classmethod
    def of(cls, config) -> LoraSettings | None:
        """None for full fine-tuning (--lora-r 0)."""
        if not config.lora_r:
            return None
        return cls(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules, config.seed)

    def targets(self) -> str | list[str]:
        names = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names


def add_adapters(lm: nn.Module, settings: LoraSettings, base_model: str) -> nn.Module:
    """Inject LoRA layers into `lm` in place (peft's LoraModel, as get_peft_model does, but without the PeftModel
    wrapper, so TokenLogprobs still finds the transformer body and the output layer where it looks). Base weights
    are frozen, adapters trainable. The adapters are created on the meta device: their values come from
    `initial_adapter_weights` when the model is loaded."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear, LoraLayer

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.targets(), task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    try:
        inject_adapter_in_model(config, lm, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    except ValueError as err:
        raise UserError(f"--lora-target-modules {settings.target_modules!r}: {first_line(err)}") from None
    others = sorted({type(m).__name__ for m in lm.modules() if isinstance(m, LoraLayer) and not isinstance(m, Linear)})
    if others:
        raise UserError(f"--lora-target-modules {settings.target_modules!r} names layers that are not linear "
                        f"({', '.join(others)}); treg-train adapts and merges linear layers only")
    output, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    if isinstance(output, LoraLayer) and output.get_base_layer().weight is embeddings.weight:
        raise UserError("--lora-target-modules: the output layer shares its weight with the input embeddings in "
                        "this model, so merging an adapter into it would change both; leave it out")
    return lm


def checkpoint_key(name: str) -> str:
    """The checkpoint's name of a wrapped model's weight: peft moves each adapted layer's own weight to
    `<layer>.base_layer.weight`."""
    return name.replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def initial_adapter_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """peft's initialisation (A as nn.Linear's default, kaiming-uniform; B zero, so the policy starts exactly
    at the checkpoint), drawn on rank 0 from a generator of its own: the same values for any number of
    processes, and the run's random state is left as it was."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            weights[name] = nn.init.kaiming_uniform_(torch.empty(parameter.shape), a=math.sqrt(5), generator=generator)
        elif ".lora_B." in name:
            weights[name] = torch.zeros(parameter.shape)
    return weights


def adapted_layers(model: nn.Module) -> dict[str, tuple[float, bool]]:
    """Each adapted layer's name (as in the model's state dict) with its scale (alpha / r) and layout."""
    from peft.tuners.lora import LoraLayer

    return {name: (module.scaling[ADAPTER], module.fan_in_fan_out) for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def merged_state(full: dict[str, torch.Tensor], layers: dict[str, tuple[float, bool]]) -> dict[str, torch.Tensor]:
    """The plain model's state dict, W + scale·B·A for every adapted layer (in fp32), every other weight as it is."""
    state = {checkpoint_key(key): value for key, value in full.items() if not is_adapter(key)}
    for layer, (scale, fan_in_fan_out) in layers.items():
        a, b = full[f"{layer}.lora_A.{ADAPTER}.weight"].float(), full[f"{layer}.lora_B.{ADAPTER}.weight"].float()
        delta = (b @ a) * scale
        state[f"{layer}.weight"] = full[f"{layer}.base_layer.weight"].float() + (delta.T if fan_in_fan_out else delta)
    return state


def save_adapter(full: dict[str, torch.Tensor], peft_config, target: Path, dtype: torch.dtype,
                 prefix: str = "lm.") -> None:
    """The adapter alone, as peft's save_pretrained writes it (adapter_config.json and adapter_model.safetensors,
    keys `base_model.model.<layer>.lora_A.weight`), so PeftModel.from_pretrained loads it onto the base model."""
    from safetensors.torch import save_file

    state = {"base_model.model." + key.removeprefix(prefix).replace(f".{ADAPTER}.", "."): value.to(dtype).contiguous()
             for key, value in full.items() if is_adapter(key)}
    peft_config.inference_mode = True
    if isinstance(peft_config.target_modules, set):  # all-linear, resolved to the layers' names: in a stable order
        peft_config.target_modules = sorted(peft_config.target_modules)
    with replacing(target, single_writer=True) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
