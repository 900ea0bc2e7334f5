"""Build the tokenizer and the causal LM from ``conf/model/*.yaml``: hub name or local folder, one path."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zephyr_lit.chat import ZEPHYR_CHAT_TEMPLATE
from zephyr_lit.errors import ConfigError

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bitsandbytes >= 0.50, on a CPU with AVX512-BF16, tries at import to fetch a hub kernel for the repacked
# CPU 4-bit layout and warns when it cannot (offline, untrusted). keep_4bit_layout switches that layout
# off, so the kernel is never used: the warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass
class ModelSpec:
    """What to load. ``random_init`` builds the architecture from ``config.json`` alone (seeded by
    ``init_seed``): the embedded default ships a config, no weights. ``config_overrides`` replace
    values of the model's config before it is built (e.g. ``{attention_dropout: 0.1}``)."""

    name_or_path: str
    tokenizer_name_or_path: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    random_init: bool = False
    init_seed: int = 0
    trust_remote_code: bool = False
    config_overrides: dict | None = None


def check_attention(implementation: str) -> None:
    """Raise a clear error for an unknown implementation or a missing flash-attn package."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation={implementation!r} is unknown; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA only): "
            "pip install 'zephyr-lit[gpu]', or set model.attn_implementation=sdpa"
        )


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer with the Zephyr chat template; pad = eos when it has no pad token (as Zephyr)."""
    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer_name_or_path or spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    return tokenizer


def build_model(spec: ModelSpec, quantization=None) -> PreTrainedModel:
    """Load (or random-init) the model in train mode, with the configured attention and dtype.

    ``quantization`` (a transformers quantization config, e.g. ``BitsAndBytesConfig``) quantises the
    weights as they load; a random init is saved to a temporary folder and loaded from there."""
    check_attention(spec.attn_implementation)
    dtype = DTYPES[spec.dtype]
    config = AutoConfig.from_pretrained(
        spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
        **dict(spec.config_overrides or {}),
    )
    if spec.random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation, dtype=dtype)
        if quantization is not None:  # weights quantise as they load: through a folder of this process's own
            with tempfile.TemporaryDirectory() as folder:  # (save_pretrained writes on rank 0 only)
                save_model(model, str(Path(folder) / "model.safetensors"))
                model.config.to_json_file(str(Path(folder) / "config.json"))
                model = load_pretrained(spec, folder, config, dtype, quantization)
    else:
        model = load_pretrained(spec, spec.name_or_path, config, dtype, quantization)
    if quantization is not None:
        keep_4bit_layout(model)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.train()  # from_pretrained returns eval mode


def keep_4bit_layout(model: PreTrainedModel) -> None:
    """Switch off bitsandbytes' in-place CPU repacking of 4-bit weights. bitsandbytes 0.50 repacks a
    layer's weight for a faster CPU kernel the first time the layer runs in eval mode without grad; a
    training pass afterwards then gets wrong gradients (the adapters' off by up to their own size on
    the tiny model). QLoRA dDPO runs both on the same layers: the reference pass, then training."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def load_pretrained(spec: ModelSpec, source: str, config, dtype: torch.dtype, quantization=None) -> PreTrainedModel:
    extra = {} if quantization is None else {"quantization_config": quantization}
    return AutoModelForCausalLM.from_pretrained(
        source,
        config=config,
        revision=spec.revision if source == spec.name_or_path else None,
        dtype=dtype,
        attn_implementation=spec.attn_implementation,
        trust_remote_code=spec.trust_remote_code,
        **extra,
    )
