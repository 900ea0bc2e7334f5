"""A callback that records, on every rank, what the ZeRO-3 tests assert about the models."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from pathlib import Path

import lightning as L
import torch

from zephyr_lit.zero3 import gathered_state_dict


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names and fp32 values, in name order."""
    h = hashlib.sha256()
    for key, value in sorted(state.items()):
        h.update(key.encode())
        h.update(value.float().numpy().tobytes())
    return h.hexdigest()


def digest(model: torch.nn.Module, keep=None) -> str:
    """Hash of the gathered weights (every rank gathers; rank 0 hashes, the result is broadcast);
    ``keep``: only the parameters whose names it accepts."""
    state = gathered_state_dict(model, keep=keep)
    text = state_digest(state) if state is not None else ""
    if torch.distributed.is_initialized():
        box = [text]
        torch.distributed.broadcast_object_list(box, src=0)
        text = box[0]
    return text


class Zero3Probe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.facts: dict = {}

    def _models(self, module):
        return {"policy": module.trained_model, "reference": getattr(module, "reference", None)}

    def on_fit_start(self, trainer, module) -> None:
        # before the module's own on_fit_start, which may precompute and free the reference
        reference = getattr(module, "reference", None)
        self._reference_param = weakref.ref(next(reference.parameters())) if reference is not None else None

    def on_train_start(self, trainer, module) -> None:
        if self._reference_param is not None and module.reference is None:
            gc.collect()
            self.facts["reference/released"] = self._reference_param() is None
        models = self._models(module)
        for name, model in models.items():
            if model is None:
                continue
            params = list(model.parameters())
            self.facts[f"{name}/partitioned"] = all(hasattr(p, "ds_id") for p in params)
            self.facts[f"{name}/local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
            self.facts[f"{name}/full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            self.facts[f"{name}/dtype"] = str(params[0].dtype)
            self.facts[f"{name}/requires_grad"] = any(p.requires_grad for p in params)
            self.facts[f"{name}/start"] = digest(model)
        optimizer = trainer.strategy.optimizers[0]
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        reference = models["reference"]
        self.facts["optimizer/has_reference"] = reference is not None and any(id(p) in optimized for p in reference.parameters())
        if getattr(module, "adapter", None) is not None:
            self.adapter_facts(module.trained_model, "start")

    def adapter_facts(self, model, when: str) -> None:
        """Hashes of the adapter's gathered weights and of the frozen base's, apart."""
        self.facts[f"adapter/{when}"] = digest(model, keep=lambda name: "lora_" in name)
        self.facts[f"base/{when}"] = digest(model, keep=lambda name: "lora_" not in name)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        reference = getattr(module, "reference", None)
        if reference is not None:
            self.facts.setdefault("reference/training_in_steps", set()).add(reference.training)
        self.facts.setdefault("policy/training_in_steps", set()).add(module.trained_model.training)

    def on_train_end(self, trainer, module) -> None:
        for name, model in self._models(module).items():
            if model is not None:
                self.facts[f"{name}/end"] = digest(model)
        if getattr(module, "adapter", None) is not None:
            self.adapter_facts(module.trained_model, "end")
        facts = {k: sorted(v) if isinstance(v, set) else v for k, v in self.facts.items()}
        facts["global_step"] = trainer.global_step
        facts["world_size"] = trainer.world_size
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts, indent=1))
