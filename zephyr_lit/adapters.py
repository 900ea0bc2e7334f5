"""LoRA and QLoRA adapters (``peft.*``, ``conf/peft/``): the adapted model, the reference as that same
model with its adapter switched off, checkpoints of the adapter alone, the adapter's learning rate and
the two exports (``adapter/`` and the merged ``model/``).

A model with an adapter is a ``peft.PeftModel`` around the causal LM. peft puts the LoRA layers inside
the LM's own linear layers, so ``unwrap(model)`` (the LM) runs with the adapter, and inside
``with adapter_disabled(model):`` the very same modules compute the untouched start model. peft and
bitsandbytes are imported only when an adapter is used (the ``.[peft]`` and ``.[qlora]`` extras).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from zephyr_lit.export import write_folder
from zephyr_lit.models import DTYPES, ModelSpec, build_model
from zephyr_lit.zero3 import gathered_state_dict, is_partitioned

METHODS = ("none", "lora", "qlora")
QUANT_TYPES = ("nf4", "fp4")
ADAPTER_DIR = "adapter"  # <output_dir>/adapter: the peft folder; <output_dir>/model: merged


@dataclass
class AdapterSpec:
    """``peft.*`` (``conf/peft/{none,lora,qlora}.yaml``; the defaults here are ``lora.yaml``'s).

    method: none (full fine-tuning) | lora | qlora (LoRA on a 4-bit base).
    r, alpha, dropout: the adapter's rank, its output scale ``alpha / r``, the dropout on its input.
    target_modules: ``all-linear`` (peft: every linear layer except the output head) or a list of names.
    lr_scale: the optimizer's lr is ``optim.lr x lr_scale``, unless ``optim.lr`` is on the command line.
    quant_type, double_quant, compute_dtype: qlora's 4-bit base (bitsandbytes ``BitsAndBytesConfig``).
    """

    method: str = "none"
    r: int = 16
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    lr_scale: float = 30.0
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    def quantization(self) -> dict | None:
        """What the 4-bit base depends on (part of the reference cache's key), or None for an unquantised base."""
        if not self.quantized:
            return None
        return {"quant_type": self.quant_type, "double_quant": self.double_quant, "compute_dtype": self.compute_dtype}


def missing_packages(method: str) -> str | None:
    """The extra to install when ``method`` needs a package that is not installed, else None."""
    if method == "lora" and importlib.util.find_spec("peft") is None:
        return "needs the peft package: pip install 'zephyr-lit[peft]'"
    if method == "qlora" and None in (importlib.util.find_spec("peft"), importlib.util.find_spec("bitsandbytes")):
        return "needs the peft and bitsandbytes packages: pip install 'zephyr-lit[qlora]'"
    return None


def learning_rate(lr: float, spec: AdapterSpec | None, overrides: list[str] | None) -> float:
    """The optimizer's peak lr: ``lr x spec.lr_scale`` with an adapter (adapters want a higher rate than
    full fine-tuning), but ``lr`` itself when ``optim.lr`` is among the command-line ``overrides``."""
    given = any(o.lstrip("+~").split("=", 1)[0] == "optim.lr" for o in overrides or [])
    if spec is None or not spec.enabled or given:
        return lr
    return lr * spec.lr_scale


# ---- the adapted model -------------------------------------------------------------------------
def quantization_config(spec: AdapterSpec):
    """bitsandbytes' 4-bit loading settings for qlora."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type, bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
    )


def build_trained_model(model_spec: ModelSpec, spec: AdapterSpec | None) -> nn.Module:
    """The network that trains: the start model itself, or (with an adapter) the start model, in 4 bits
    for qlora, frozen, plus a new LoRA adapter, the only trainable part."""
    if spec is None or not spec.enabled:
        return build_model(model_spec)
    base = build_model(model_spec, quantization=quantization_config(spec) if spec.quantized else None)
    return add_adapter(base, spec, model_spec.gradient_checkpointing)


def add_adapter(model: nn.Module, spec: AdapterSpec, gradient_checkpointing: bool) -> nn.Module:
    """``model`` frozen, wrapped with a new LoRA adapter (B = 0: at first it computes exactly ``model``)."""
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    if is_partitioned(adapted):
        init_partitioned_adapter(adapted)
    if gradient_checkpointing:  # peft: a checkpointed block whose input needs no grad would give the adapter none
        adapted.enable_input_require_grads()
    return adapted.train()


def init_partitioned_adapter(model: nn.Module) -> None:
    """Initialise the adapter again, whole: under ZeRO-3 (``deepspeed.zero.Init``) peft's own init ran on
    empty shards and left B != 0, so the policy did not start as the start model. Rank 0 draws A
    (uniform, as ``nn.Linear``) and sets B = 0 on the gathered tensors; every rank gets its shards of them."""
    import deepspeed
    import torch.distributed as dist
    from peft.tuners.lora import LoraLayer

    for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
        params = [p for name, p in layer.named_parameters() if "lora_" in name]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                for name in layer.lora_A:
                    layer.reset_lora_parameters(name, True)


def is_adapted(model: nn.Module | None) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a ``PeftModel`` (its LoRA layers included); any other model as it is."""
    return model.get_base_model() if is_adapted(model) else model


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes its start model: adapter off and eval mode (no dropout), as a
    frozen reference does. On exit the adapter and the previous train/eval mode are back."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


# ---- checkpoints: the adapter alone ---------------------------------------------------------------
def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def keep_only(state: dict, names: set[str]) -> None:
    """Drop from ``state`` (a checkpoint's ``state_dict``) every entry not named in ``names``, in place."""
    for key in [k for k in state if k not in names]:
        del state[key]


def check_holds(state: dict, names: set[str]) -> None:
    """Raise when the checkpoint's ``state`` lacks any of the adapter's parameters ``names``."""
    missing = sorted(names - state.keys())
    if missing:
        raise RuntimeError(
            f"the checkpoint has no values for {len(missing)} of the {len(names)} adapter parameters (first: "
            f"{missing[0]}): it was written by a run with other peft settings; resume with the same peft.*"
        )


# ---- exports ------------------------------------------------------------------------------------
def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's parameters, full shapes, on rank 0's CPU (None on the other ranks). Under ZeRO-3
    every rank must call this: only the adapter's shards are gathered, never the base's."""
    return gathered_state_dict(model, keep=trainable_names(model).__contains__)


def export_adapter(model: nn.Module, tokenizer, target: Path, weights: dict[str, torch.Tensor] | None) -> Path:
    """``target``: the peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) and the
    tokenizer, written whole (``export.write_folder``). ``weights`` replaces the model's own (ZeRO-3)."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=weights, save_embedding_layers=False)
        tokenizer.save_pretrained(folder)

    return write_folder(target, write)


def merged_model(adapter_dir: Path, model_spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The adapter in ``adapter_dir`` merged into a fresh, unquantised copy of the start model
    (``W + (alpha / r) B A`` for every adapted layer), in ``dtype``: a plain transformers model."""
    from peft import PeftModel

    base = build_model(replace(model_spec, gradient_checkpointing=False))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype).eval()


def run_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the run holds its unquantised weights in (the input embeddings': never quantised)."""
    return unwrap(model).get_input_embeddings().weight.dtype
