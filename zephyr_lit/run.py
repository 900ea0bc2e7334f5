"""``train(cfg)``: check config -> data -> module -> trainer -> fit -> export -> summary.

Everything a run writes lands under ``paths.output_dir``:
``model/`` (the export), ``checkpoints/last.ckpt``, ``metrics.csv``, ``wandb/``, ``summary.json``
(and Hydra's ``.hydra/`` and ``train.log`` when launched through ``train.py``); with ``peft=lora|qlora``
also ``adapter/``, and ``model/`` is the adapter merged into the start model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from zephyr_lit.adapters import (
    ADAPTER_DIR,
    adapter_weights,
    export_adapter,
    is_adapted,
    learning_rate,
    merged_model,
    run_dtype,
)
from zephyr_lit.callbacks import Throughput, ValidateAtEdges
from zephyr_lit.checkpointing import atomic_write
from zephyr_lit.config import check_config
from zephyr_lit.export import export_model, point_latest
from zephyr_lit.launch import is_multi_process
from zephyr_lit.models import load_tokenizer
from zephyr_lit.preemption import Preempted, slurm_restarts
from zephyr_lit.reference import ReferenceCache
from zephyr_lit.zero3 import gathered_state_dict, hf_zero3_paused, is_partitioned

log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, strategy=instantiate(cfg.strategy))


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` means ``<output_dir>/checkpoints/last.ckpt`` (a fresh start when there is none yet). Without a
    ``ckpt_path``, a job that SLURM restarted (``SLURM_RESTART_COUNT`` >= 1: requeued after preemption, or after a
    node failure) resumes from that file when it exists. An explicit ``ckpt_path`` always wins."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path is None:
        restarts = slurm_restarts()
        if restarts and last.exists():
            log.info("SLURM restarted this job (SLURM_RESTART_COUNT=%d): resuming from %s", restarts, last)
            return str(last)
        return None
    if ckpt_path != "last":
        return ckpt_path
    if last.exists():
        return str(last)
    log.warning("ckpt_path=last but %s does not exist: starting from scratch", last)
    return None


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}


def initial_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The validation metrics before the first optimizer step of this fit (empty if not validated)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ValidateAtEdges):
            return dict(sorted(callback.initial_metrics.items()))
    return {}


def throughput(trainer: L.Trainer) -> dict[str, float]:
    for callback in trainer.callbacks:
        if isinstance(callback, Throughput):
            return dict(callback.stats)
    return {}


def describe(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"{k} {before[k]:.4g} -> {v:.4g}" if k in before else f"{k} {v:.4g}" for k, v in after.items())


def write_summary(path: Path, summary: dict) -> None:
    """``summary`` as JSON at ``path``, atomically: an interrupted write leaves the old file."""
    with atomic_write(path) as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")


def build_module(
    cfg: DictConfig, model_spec, tokenizer: PreTrainedTokenizerBase, exact_match: list[dict], datamodule=None,
    overrides: list[str] | None = None,
) -> L.LightningModule:
    """The configured module (``cfg.module``, plus ``cfg.dpo`` and the reference cache over
    ``datamodule`` when present, and ``cfg.peft``'s adapter); models come later. With an adapter the
    optimizer's lr is ``adapters.learning_rate`` (``overrides``: the command line's)."""
    adapter = instantiate(cfg.peft) if "peft" in cfg else None
    extra, optimizer = {}, {}
    if adapter is not None and adapter.enabled:
        extra["adapter"] = adapter
        optimizer["lr"] = learning_rate(cfg.optim.lr, adapter, overrides)
        log.info("peft=%s: optimizer lr %.3g (optim.lr %.3g x peft.lr_scale %.3g, unless optim.lr is on the "
                 "command line)", adapter.method, optimizer["lr"], cfg.optim.lr, adapter.lr_scale)
    if "dpo" in cfg:
        dpo = instantiate(cfg.dpo)
        quantization = adapter.quantization() if adapter is not None else None
        extra |= {"dpo": dpo, "reference_cache": ReferenceCache(model_spec, datamodule, dpo.average,
                                                                 dpo.ref.cache_dir, quantization)}
    return instantiate(cfg.module, _partial_=True)(
        **extra,
        model=model_spec,
        optimizer=instantiate(cfg.optim.optimizer, **optimizer),
        scheduler=cfg.optim.scheduler,
        warmup_ratio=cfg.optim.warmup_ratio,
        tokenizer=tokenizer,
        exact_match=exact_match,
    )


@dataclass
class Run:
    """Everything one experiment needs, built and checked, before ``fit``."""

    cfg: DictConfig
    output_dir: Path
    tokenizer: PreTrainedTokenizerBase
    datamodule: L.LightningDataModule
    module: L.LightningModule
    trainer: L.Trainer


def prepare_run(cfg: DictConfig, overrides: list[str] | None = None) -> Run:
    """Check the config, prepare the data (every row checked and tokenised before any model exists:
    here in a single process, in Lightning's ``prepare_data``/``setup`` when the cluster started
    several), then set up the module and the trainer. Models are built later, in ``configure_model``.
    ``overrides``: the command line's (an ``optim.lr`` there is an adapter's lr as given)."""
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    model_spec = instantiate(cfg.model)
    tokenizer = load_tokenizer(model_spec)
    datamodule = instantiate(cfg.data)
    datamodule.dropped_rows_path = output_dir / "dropped_rows.jsonl"  # with data.bad_rows=drop
    datamodule.use_tokenizer(tokenizer)
    if not is_multi_process():  # one process: tokenise now, so bad data fails before the trainer exists
        datamodule.tokenize()  # (several: Lightning's prepare_data on one of them, then setup on all)

    module = build_module(cfg, model_spec, tokenizer, datamodule.exact_match, datamodule, overrides)
    trainer = build_trainer(cfg, output_dir)
    return Run(cfg, output_dir, tokenizer, datamodule, module, trainer)


def export(run: Run) -> dict[str, Path]:
    """Rank 0 writes ``model/`` (with an adapter: first ``adapter/``, then the adapter merged into the
    unquantised start model as ``model/``); every rank must call it (ZeRO-3 gathers on all ranks)."""
    module, is_zero = run.module, run.trainer.is_global_zero
    model, export_dir = module.trained_model, run.output_dir / "model"
    if not is_adapted(model):
        weights = gathered_state_dict(model) if is_partitioned(model) else None  # every rank gathers, rank 0 keeps
        if is_zero:
            export_model(model, run.tokenizer, export_dir, state_dict=weights)
        return {"export_dir": export_dir}
    adapter_dir = run.output_dir / ADAPTER_DIR
    weights = adapter_weights(model)
    if is_zero:
        export_adapter(model, run.tokenizer, adapter_dir, weights)
        with hf_zero3_paused(module.hf_deepspeed_config):  # rank 0 alone builds the start model whole
            merged = merged_model(adapter_dir, module.model_spec, run_dtype(model))
        export_model(merged, run.tokenizer, export_dir)
    return {"export_dir": export_dir, "adapter_dir": adapter_dir}


def train(cfg: DictConfig, overrides: list[str] | None = None, update_latest: bool = True) -> dict:
    """Run one experiment described by ``cfg`` and return its summary (also in ``summary.json``)."""
    started = time.time()
    run = prepare_run(cfg, overrides)
    trainer, module, output_dir = run.trainer, run.module, run.output_dir
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, output_dir))
    except Preempted as stop:  # every rank saved at a window end: no export, no summary, `latest` stays
        if trainer.is_global_zero:
            print(stop, flush=True)
        raise SystemExit(stop.exit_code) from None

    exports = export(run)
    trainer.strategy.barrier()
    summary = {
        "experiment": cfg.experiment_name,
        "output_dir": str(output_dir),
        **{key: str(path) for key, path in exports.items()},
        "global_step": trainer.global_step,
        "planned_steps": int(trainer.estimated_stepping_batches),  # what the LR schedule was built for
        "metrics": final_metrics(trainer),
        "initial_metrics": initial_metrics(trainer),
        "overrides": list(overrides or []),
        "throughput": throughput(trainer),  # rank 0's
        "nonfinite_skipped_steps": module.nonfinite.skipped,  # module.nonfinite=skip (the same on every rank)
        "data": {name: vars(stats) for name, stats in run.datamodule.stats.items()},
        "duration_s": round(time.time() - started, 1),
    }
    if trainer.is_global_zero:
        write_summary(output_dir / "summary.json", summary)
        if update_latest:
            point_latest(Path(cfg.paths.root).resolve() / cfg.experiment_name / "latest", output_dir)
        if "adapter_dir" in exports:
            print(f"Exported adapter: {exports['adapter_dir']} (merged into the model below)")
        print(f"Exported model: {exports['export_dir']}")
        print("Validation (before -> after): " + describe(summary["initial_metrics"], summary["metrics"]))
        speed = summary["throughput"]
        if "samples_per_s" in speed:
            print(f"Throughput (rank 0, after warm-up): {speed['samples_per_s']:.2f} rows/s, "
                  f"{speed['tokens_per_s']:.0f} tokens/s; peak memory {speed['peak_memory_gib']:.2f} GiB")
    return summary
