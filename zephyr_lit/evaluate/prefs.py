"""``task=prefs``: DPO's metrics for any policy against any reference on any preference set.

    python -m zephyr_lit.evaluate task=prefs model_path=outputs/ddpo/latest reference_path=outputs/dsft/latest \
        data.path=HuggingFaceH4/ultrafeedback_binarized dpo.beta=0.1

The training code does all of it, so the numbers mean what a dDPO run's ``val/*`` mean:
``PreferenceDataModule`` reads and tokenises ``data.test_split`` of ``data.path`` with the same ``data.*``
keys (lengths, truncation, ``max_eval_samples``, ``bad_rows``); ``DPOModule``'s validation step scores every
pair under the policy (``model_path``) and the reference (``reference_path``) and applies the configured
loss (``dpo.*``); its validation means are over every pair of the split: ``rewards/accuracies`` (chosen
reward > rejected reward, ties lose), ``rewards/margins``, ``rewards/chosen``, ``rewards/rejected``,
``logps/*``, ``logits/*`` and ``loss`` (the mean DPO loss, + ``dpo.rpo_alpha`` x the chosen tokens' mean NLL).
Lightning's validate loop runs it on one device in ``prefs.precision``. They are written to
``output_dir/results.json``, next to what was compared.

To reproduce a dDPO run's final ``val/*``: its export, the model it started from as the reference, its
``data.*`` and ``dpo.*`` (``rpo_alpha`` included) and its dtype and precision (``prefs.dtype``,
``prefs.precision``). ``dpo.ref.*`` (precompute, TR-DPO sync) concerns training and is not used here.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from zephyr_lit.config import dpo_problems
from zephyr_lit.data.preference import PreferenceDataModule
from zephyr_lit.data.validate import BAD_ROWS
from zephyr_lit.evaluate.app import resolve_model
from zephyr_lit.jsonl import write_json
from zephyr_lit.models import ATTENTION_IMPLEMENTATIONS, DTYPES, ModelSpec, build_model, load_tokenizer
from zephyr_lit.modules.dpo import DPOModule
from zephyr_lit.reference import ReferenceSettings, freeze

RESULTS = "results.json"
DPO_KEYS = ("beta", "loss_type", "label_smoothing", "average_log_prob", "rpo_alpha")
HEADLINE = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "loss")


def prefs_problems(cfg: DictConfig) -> list[str]:
    """``reference_path``, ``data.*``, ``dpo.*`` and ``prefs.*`` values that cannot work (``model_path``
    and ``output_dir`` are the app's)."""
    problems = []
    reference = cfg.get("reference_path")
    if not reference:
        problems.append("reference_path is not set: give the model the policy is compared with (for a dDPO "
                        "run, the export it started from, e.g. outputs/dsft/latest)")
    elif Path(str(reference)).expanduser().exists() and not Path(resolve_model(str(reference)).path,
                                                                  "config.json").is_file():
        problems.append(f"reference_path={reference}: no config.json there; point it at an export folder (a run "
                        "folder's model/)")
    data, prefs = cfg.data, cfg.prefs
    if not str(data.get("_target_", "")).endswith(PreferenceDataModule.__name__):
        problems.append(f"data={data.get('_target_')}: task=prefs needs preference data (chosen/rejected), e.g. "
                        "data=ultrafeedback_binarized or data.path=<folder or file>")
    if not data.get("path"):
        problems.append("data.path is not set: give a hub name, a local folder or a file of preference pairs")
    if data.max_length < 16:
        problems.append(f"data.max_length={data.max_length}: must be >= 16")
    prompt = data.get("max_prompt_length")
    if prompt is not None and not 2 <= prompt < data.max_length:
        problems.append(f"data.max_prompt_length={prompt}: must be >= 2 and < data.max_length={data.max_length} "
                        "(or null)")
    if (data.get("eval_batch_size") or data.batch_size) < 1:
        problems.append(f"data.eval_batch_size={data.get('eval_batch_size')}: must be >= 1")
    if data.get("bad_rows", "error") not in BAD_ROWS:
        problems.append(f"data.bad_rows={data.bad_rows}: must be one of {', '.join(BAD_ROWS)}")
    problems += dpo_problems(cfg)
    if prefs.dtype not in DTYPES:
        problems.append(f"prefs.dtype={prefs.dtype}: must be one of {', '.join(DTYPES)}")
    if prefs.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        problems.append(f"prefs.attn_implementation={prefs.attn_implementation}: must be one of "
                        f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if prefs.length_groups < 1:
        problems.append(f"prefs.length_groups={prefs.length_groups}: must be >= 1")
    return problems


def model_spec(path: str, prefs: DictConfig) -> ModelSpec:
    """How to load ``path`` (an export folder or a hub name) for scoring."""
    return ModelSpec(name_or_path=path, dtype=prefs.dtype, attn_implementation=prefs.attn_implementation,
                     trust_remote_code=prefs.trust_remote_code)


def preference_split(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[PreferenceDataModule, DataLoader]:
    """The data module and the loader of ``data.test_split`` (checked, tokenised and truncated as in
    training; the training split is never read)."""
    datamodule = instantiate(cfg.data)
    datamodule.use_tokenizer(tokenizer)
    split = datamodule.load(datamodule.test_split, datamodule.max_eval_samples)
    datamodule.val_set = datamodule.build(split, tokenizer)
    return datamodule, datamodule.val_dataloader()  # no trainer attached: one shard, the whole split


def scorer(cfg: DictConfig, reference_path: str, tokenizer: PreTrainedTokenizerBase) -> DPOModule:
    """A ``DPOModule`` holding the policy and the frozen reference (never trained: no optimizer)."""
    dpo = instantiate(cfg.dpo)
    dpo.ref = ReferenceSettings()  # training's reference options (cache, TR-DPO sync) do not apply: one pass
    module = DPOModule(model=model_spec(str(cfg.model_path), cfg.prefs), optimizer=None, tokenizer=tokenizer,
                       dpo=dpo, length_groups=cfg.prefs.length_groups)
    module.policy = build_model(module.model_spec).eval()
    module.reference = freeze(build_model(model_spec(reference_path, cfg.prefs)))
    return module


def run_prefs(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """The policy's validation metrics against the reference on the preference split; also in ``results.json``."""
    reference_path = resolve_model(str(cfg.reference_path)).path
    tokenizer = load_tokenizer(model_spec(str(cfg.model_path), cfg.prefs))
    datamodule, loader = preference_split(cfg, tokenizer)  # bad data stops the task before any model loads
    module = scorer(cfg, reference_path, tokenizer)
    trainer = L.Trainer(accelerator=cfg.prefs.accelerator, devices=1, precision=cfg.prefs.precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        use_distributed_sampler=False, default_root_dir=str(output_dir))
    trainer.validate(module, dataloaders=loader, verbose=False)
    metrics = {name.removeprefix("val/"): float(value) for name, value in sorted(trainer.callback_metrics.items())
               if name.startswith("val/")}
    split = datamodule.stats[datamodule.test_split]
    setup = {"model_id": str(cfg.model_id), "model_path": str(cfg.model_path), "reference_path": reference_path,
             "data": {"path": str(datamodule.path), "split": datamodule.test_split, "rows": split.rows,
                      "pairs": split.pairs, "dropped": split.dropped},
             "dpo": {key: value for key, value in OmegaConf.to_container(cfg.dpo).items() if key in DPO_KEYS},
             "dtype": cfg.prefs.dtype, "precision": str(cfg.prefs.precision)}
    write_json(output_dir / RESULTS, {**metrics, "setup": setup})
    print(f"{cfg.model_id} against {reference_path} on {datamodule.path} split '{datamodule.test_split}' "
          f"({split.pairs} pairs): " + ", ".join(f"{name} {metrics[name]:.4g}" for name in HEADLINE))
    print(f"Results: {output_dir / RESULTS}")
    return metrics
