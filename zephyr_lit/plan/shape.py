"""The model's shape, from the config's ``model.name_or_path`` (or ``--arch``).

Sources, in order: a local folder with ``config.json`` (read with ``transformers.AutoConfig``); the
built-in table ``KNOWN_SHAPES`` (no hub access needed); an export that a previous stage will write
(``<root>/<experiment>/latest/model``: the shape of that experiment's model); the local Hugging
Face cache. Only Mistral / Llama-style decoders are supported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from zephyr_lit.errors import UserInputError
from zephyr_lit.plan.settings import CONF_DIR, compose_config

#: Architecture of models whose ``config.json`` may not be available offline.
KNOWN_SHAPES: dict[str, dict] = {
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}


@dataclass(frozen=True)
class ModelShape:
    """A Mistral / Llama-style decoder: embedding, L x (RMSNorm, q/k/v/o attention with GQA,
    RMSNorm, SwiGLU gate/up/down), final RMSNorm, LM head (untied unless ``tied``)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    attention_bias: bool = False  # Llama's ``attention_bias``: q, k, v and o get biases
    mlp_bias: bool = False  # Llama's ``mlp_bias``
    source: str = ""

    @classmethod
    def from_config(cls, config, source: str = "") -> ModelShape:
        """From a transformers config (or a dict with the same keys)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        model_type = get("model_type")
        if model_type not in ("mistral", "llama"):
            raise UserInputError(
                f"model_type={model_type!r} ({source or 'model'}): "
                "the planner knows Mistral / Llama-style decoders only"
            )
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        llama = model_type == "llama"
        return cls(
            vocab=int(get("vocab_size")),
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            tied=bool(get("tie_word_embeddings", False)),
            attention_bias=llama and bool(get("attention_bias", False)),
            mlp_bias=llama and bool(get("mlp_bias", False)),
            source=source,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """One decoder layer's linear layers as ``(name, d_in, d_out)``, in model order (the LM head is not
        among them)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def modules(self) -> list[tuple[str, list[int]]]:
        """Every module with parameters and the element counts of its tensors, in model order."""
        h = self.hidden
        attention, mlp = self.linears()[:4], self.linears()[4:]

        def linears(prefix: str, specs: list[tuple[str, int, int]], bias: bool) -> list[tuple[str, list[int]]]:
            return [(prefix + name, [n_in * n_out] + ([n_out] if bias else [])) for name, n_in, n_out in specs]

        out = [("embed_tokens", [self.vocab * h])]
        for layer in range(self.layers):
            p = f"layers.{layer}."
            out += [(p + "input_layernorm", [h]), *linears(p, attention, self.attention_bias),
                    (p + "post_attention_layernorm", [h]), *linears(p, mlp, self.mlp_bias)]
        out.append(("norm", [h]))
        if not self.tied:
            out.append(("lm_head", [self.vocab * h]))
        return out

    def num_parameters(self) -> int:
        """Exact: equals ``sum(p.numel() for p in model.parameters())`` of the built model."""
        return sum(sum(sizes) for _, sizes in self.modules())

    def persistent_parameters(self, threshold: int) -> int:
        """Elements in tensors of at most ``threshold`` elements (kept whole under ZeRO-3)."""
        return sum(n for _, sizes in self.modules() for n in sizes if n <= threshold)

    def largest_module(self) -> int:
        """Elements of the largest module (ZeRO-3 gathers it whole)."""
        return max(sum(sizes) for _, sizes in self.modules())

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, {self.heads} heads / "
            f"{self.kv_heads} KV heads x {self.head_dim}, vocab {self.vocab}, "
            f"{'tied' if self.tied else 'untied'} embeddings"
        )


def _shape_from_folder(folder: Path) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(str(folder)), source=f"{folder}/config.json")


def _shape_from_table(name: str) -> ModelShape:
    return ModelShape.from_config(KNOWN_SHAPES[name], source=f"built-in table for {name}")


def _export_experiment(name_or_path: str, conf_dir: Path) -> str | None:
    """``<root>/<experiment>/latest/model`` -> ``<experiment>`` when conf/experiment has it."""
    parts = Path(name_or_path).parts
    if len(parts) >= 3 and parts[-2:] == ("latest", "model"):
        if (conf_dir / "experiment" / f"{parts[-3]}.yaml").is_file():
            return parts[-3]
    return None


def resolve_shape(name_or_path: str, conf_dir: Path = CONF_DIR, _seen: tuple[str, ...] = ()) -> ModelShape:
    """The shape of ``name_or_path``, from the first source that has it (see the module docstring)."""
    folder = Path(name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return _shape_from_folder(folder)
    if name_or_path in KNOWN_SHAPES:
        return _shape_from_table(name_or_path)
    experiment = _export_experiment(name_or_path, conf_dir)
    if experiment and experiment not in _seen:
        parent = compose_config([f"+experiment={experiment}"], conf_dir).model.name_or_path
        shape = resolve_shape(str(parent), conf_dir, _seen + (experiment,))
        source = f"{name_or_path} not written yet: the export of +experiment={experiment} -> {shape.source}"
        return replace(shape, source=source)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        raise UserInputError(
            f"no config.json for model {name_or_path!r} (not a local folder, not in the Hugging Face cache, not in "
            f"the planner's table {sorted(KNOWN_SHAPES)}): pass --arch with a known name or a folder with config.json"
        ) from None
    return ModelShape.from_config(config, source=f"{name_or_path} (Hugging Face cache)")
