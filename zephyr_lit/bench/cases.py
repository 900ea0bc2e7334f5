"""What is compared: each case runs zephyr-lit with ``ours`` options and TRL with ``trl`` options.

Options read by the workers (``ours.py``, ``trl_side.py``):

- ours: ``order`` (``sequential``: the rows in index order, ``grouped``: the length-grouped batches
  that ``data.group_by_length=true`` draws), ``precompute`` (``dpo.ref.precompute``), ``length_groups`` (``module.length_groups``), ``packing`` (SFT: our ``pack_sequences``
  into rows of at most ``max_length`` tokens, batches of that many packed rows).
  ``peft`` (``lora``: ``peft=lora`` with the workload's adapter, see ``lora.py``).
- trl: ``sampler`` (``sequential`` or TRL's ``default``: random), ``optim`` (``adamw_torch``, the
  same ``torch.optim.AdamW`` as ours, or TRL's ``default``: fused AdamW), ``ref_model`` (an explicit
  reference model; without one TRL precomputes with the policy itself), ``precompute``
  (``precompute_ref_log_probs``), ``padding_free``, ``packing`` (BFD, which implies padding-free),
  ``peft`` (``lora``: ``peft_config`` with the same adapter; without a ref_model TRL's reference is the
  policy with its adapter disabled, as ours).

Every TRL run is fp32 without gradient checkpointing (TRL turns on bf16 autocast and gradient
checkpointing by default; the workload is fp32). ``same_batches``: both trainers see the same rows
in the same batches and order, so their per-step losses must agree (the parity column).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "dpo" | "sft"
    title: str
    ours: dict = field(default_factory=dict)
    trl: dict = field(default_factory=dict)
    same_batches: bool = False
    ours_label: str = ""
    trl_label: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "title": self.title, "ours": dict(self.ours),
                "trl": dict(self.trl), "same_batches": self.same_batches}


EQUAL_TRL = {"sampler": "sequential", "optim": "adamw_torch"}

CASES: tuple[Case, ...] = (
    Case(
        "dpo-online", "dpo", "DPO, equal settings, online reference",
        ours={"order": "sequential", "precompute": False},
        trl={**EQUAL_TRL, "ref_model": True, "precompute": False},
        same_batches=True,
        ours_label="reference model forward every step",
        trl_label="explicit ref_model, sequential sampler, optim=adamw_torch",
    ),
    Case(
        "dpo-precompute", "dpo", "DPO, equal settings, precomputed reference log-probs",
        ours={"order": "sequential", "precompute": True},
        trl={**EQUAL_TRL, "ref_model": False, "precompute": True},
        same_batches=True,
        ours_label="dpo.ref.precompute=true",
        trl_label="precompute_ref_log_probs=True (no ref_model: it precomputes with the policy, keeps no copy)",
    ),
    Case(
        "dpo-best", "dpo", "DPO, our best settings vs TRL default",
        ours={"order": "grouped", "precompute": True},
        trl={"sampler": "default", "optim": "default", "ref_model": True, "precompute": False},
        ours_label="dpo.ref.precompute=true + data.group_by_length=true (length-grouped batches)",
        trl_label="TRL defaults (random sampler, fused AdamW, online ref_model) but fp32, no grad checkpointing",
    ),
    Case(
        "dpo-lora", "dpo", "DPO with LoRA, equal settings: the reference is the policy with its adapter off",
        ours={"order": "sequential", "precompute": False, "peft": "lora"},
        trl={**EQUAL_TRL, "ref_model": False, "precompute": False, "peft": "lora"},
        same_batches=True,
        ours_label="peft=lora (r 16, alpha 16, dropout 0, q/k/v/o/gate/up/down), reference = adapter off",
        trl_label="peft_config=LoraConfig (same r, alpha, dropout, targets), no ref_model, sequential sampler, "
                  "optim=adamw_torch; both adapters start from the same values",
    ),
    Case(
        "sft-padded", "sft", "SFT, equal settings, padded batches",
        ours={"order": "sequential", "packing": False},
        trl={**EQUAL_TRL, "padding_free": False, "packing": False},
        same_batches=True,
        ours_label="padded batches (pad_batch, multiple of 8)",
        trl_label="padded batches, sequential sampler, optim=adamw_torch",
    ),
    Case(
        "sft-padding-free", "sft", "SFT without packing: ours length-grouped passes vs TRL padding_free",
        ours={"order": "sequential", "packing": False, "length_groups": 4},
        trl={**EQUAL_TRL, "padding_free": True, "packing": False},
        same_batches=True,
        ours_label="padded batches run as up to 4 passes of similar length (module.length_groups=4)",
        trl_label="padding_free=True (each batch flattened into one row), same batches",
    ),
    Case(
        "sft-packed", "sft", "SFT with packing: ours vs TRL's best (BFD packing)",
        ours={"order": "sequential", "packing": True},
        trl={"sampler": "default", "optim": "default", "padding_free": True, "packing": True},
        ours_label="packing=true (in-order greedy packing, rows <= max_length)",
        trl_label="packing=True, packing_strategy=bfd (padding-free), TRL default sampler and optimizer",
    ),
)

CASE_NAMES = tuple(case.name for case in CASES)


def select_cases(names: list[str] | None) -> list[Case]:
    """The named cases in table order (all when ``names`` is empty); prefixes like ``dpo`` select a kind."""
    if not names:
        return list(CASES)
    chosen = [c for c in CASES if any(c.name == n or c.name.startswith(n + "-") or c.kind == n for n in names)]
    unknown = [n for n in names if not any(c.name == n or c.name.startswith(n + "-") or c.kind == n for c in CASES)]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASE_NAMES)}")
    return chosen
