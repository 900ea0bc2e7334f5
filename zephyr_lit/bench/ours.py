"""Our side of one benchmark run: the real config, module and Lightning trainer, fed the workload's rows.

The config is composed from ``conf/`` as ``train.py`` would (``module=sft`` or ``module=dpo`` with
``+dpo=default``) with the workload's settings as overrides; the module is instantiated the way
``zephyr_lit.run.prepare_run`` does it, and the Lightning trainer from ``cfg.trainer`` with logging,
checkpointing and validation off. Only the data module is replaced: a small adapter serves the
workload's token rows through our own collation (``collate_pairs``, ``pad_batch``,
``pack_sequences``) in the planned order, and the reference precompute pass (``dpo.ref.precompute``)
gets its unshuffled loader from it like ``PreferenceDataModule.precompute_dataloader``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from zephyr_lit.bench.lora import load_lora_init, ours_overrides
from zephyr_lit.bench.measure import StepRecorder
from zephyr_lit.bench.workload import (
    Workload,
    label_count,
    pair_length,
    plan_steps,
    sequential_batches,
    window_label_tokens,
    window_rows,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_ours(w: Workload, kind: str, options: dict, model_dir: str, work_dir: Path, extra: list[str] = ()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import zephyr_lit.config  # noqa: F401  (registers ${asset:...} and ${run_stamp:})

    if w.dtype != "float32":
        raise ValueError("the benchmark compares fp32 runs only (dtype=float32)")
    overrides = [
        f"paths.root={work_dir}",
        f"paths.output_dir={work_dir}",
        f"seed={w.seed}",
        f"model.name_or_path={model_dir}",
        "model.random_init=true",
        f"model.init_seed={w.seed}",
        f"model.dtype={w.dtype}",
        f"model.attn_implementation={w.attn}",
        "model.gradient_checkpointing=false",
        f"optim.lr={w.lr}",
        "optim.warmup_ratio=0.0",
        "optim.scheduler=constant",
        "trainer.precision=32-true",
        f"trainer.accumulate_grad_batches={w.accumulate}",
    ]
    if kind == "dpo":
        overrides += [
            "module=dpo", "+dpo=default", "data=ultrafeedback_tiny",
            f"dpo.beta={w.beta}", f"dpo.loss_type={w.loss_type}",
            f"dpo.ref.precompute={str(bool(options.get('precompute'))).lower()}",
            f"dpo.ref.cache_dir={work_dir / 'reference-cache'}",
        ]
    else:
        overrides += ["module=sft", "data=ultrachat_tiny"]
    if "length_groups" in options:
        overrides.append(f"module.length_groups={options['length_groups']}")
    if options.get("peft") == "lora":
        overrides += ours_overrides(w)
    overrides += list(extra)  # --ours KEY=VALUE
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _loader(samples: list, collate):
    from torch.utils.data import DataLoader

    # batch_size=None: each sample is one whole batch plan, collated when the loop asks for it.
    return DataLoader(samples, batch_size=None, shuffle=False, collate_fn=collate, num_workers=0)


class PrecomputePlan(list):
    """Batches of row indices for the reference pass: ``size`` rows in the split, of which only
    ``required`` are ever looked up (the rows the timed steps read)."""

    def __init__(self, batches: list[list[int]], size: int, required: list[int]) -> None:
        super().__init__(batches)
        self.size, self.required = size, required


def grouped_batches(w: Workload, rows: list[dict], epoch: int) -> list[list[int]]:
    """One epoch of length-grouped pair batches, drawn by the data modules' own sampler
    (``data.group_by_length=true``, one rank, no accumulation)."""
    from zephyr_lit.data.sampler import WindowBatchSampler

    sampler = WindowBatchSampler([0] * len(rows), w.pair_batch, accumulate=1, shuffle=True, seed=w.seed,
                                 lengths=[pair_length(r) for r in rows])
    sampler.set_epoch(epoch)
    return [[index for index, *_ in batch] for batch in sampler]


def build_data(w: Workload, kind: str, options: dict, rows: list[dict], pad_id: int, pad_to_multiple_of):
    """The Lightning data module adapter, the number of micro-batches it serves and of rows it draws
    them from (packed rows when packing)."""
    import lightning as L

    if kind == "dpo":
        from zephyr_lit.data.preference import collate_pairs

        def collate(sample):
            indices, window = sample if isinstance(sample, tuple) else (sample, {})
            return collate_pairs([dict(rows[i], **window) for i in indices], pad_id=pad_id,
                                 pad_to_multiple_of=pad_to_multiple_of)

        if options.get("order") == "grouped":
            plan = plan_steps(lambda epoch: grouped_batches(w, rows, epoch), w.steps, w.accumulate)
        else:
            plan = plan_steps(lambda epoch: sequential_batches(len(rows), w.pair_batch), w.steps, w.accumulate)
        chosen = [len(r["chosen_input_ids"]) for r in rows]  # the window's count for the RPO token mean
        windows = [{"window_tokens": t, "window_rows": n}
                   for t, n in zip(window_label_tokens(plan, chosen, w.accumulate), window_rows(plan, w.accumulate))]
        train = _loader(list(zip(plan, windows)), collate)
        used = sorted({i for batch in plan for i in batch})  # the reference precompute covers these rows only
        every = [used[start : start + w.pair_batch] for start in range(0, len(used), w.pair_batch)]
        precompute = {"train": _loader(PrecomputePlan(every, len(rows), used), collate),
                      "val": _loader(PrecomputePlan(every[:1], len(rows), every[0]), collate)}
        served = len(used)
    else:
        from zephyr_lit.data.collate import pad_batch
        from zephyr_lit.data.tokenize import pack_sequences

        sequences = rows
        if options.get("packing"):
            packed = pack_sequences([r["input_ids"] for r in rows], [r["labels"] for r in rows], w.max_length)
            sequences = [dict(zip(packed, values)) for values in zip(*packed.values())]
        counts = [label_count(r["labels"]) for r in sequences]
        plan = plan_steps(lambda epoch: sequential_batches(len(sequences), w.sft_batch), w.steps, w.accumulate)
        windows = list(zip(window_label_tokens(plan, counts, w.accumulate), window_rows(plan, w.accumulate)))

        def collate(sample):
            indices, (window_tokens, rows_in_window) = sample
            batch_rows = [dict(sequences[i], window_tokens=window_tokens, window_rows=rows_in_window) for i in indices]
            batch = pad_batch(batch_rows, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of,
                              attn_implementation=w.attn)
            # sequences in the batch (a packed row holds several); read by the bench only
            batch["bench_sequences"] = sum(r["position_ids"].count(0) if "position_ids" in r else 1 for r in batch_rows)
            return batch

        train = _loader(list(zip(plan, windows)), collate)
        precompute = {}
        served = len(sequences)

    class BenchData(L.LightningDataModule):
        fingerprint = f"bench-{uuid.uuid4().hex}"  # never reuse a reference cache: precompute is measured

        def train_dataloader(self):
            return train

        def precompute_dataloader(self, split: str):
            return precompute["train" if split in ("train", "train_prefs") else "val"]

    return BenchData(), len(plan), served


def run_ours(job: dict, recorder: StepRecorder) -> dict:
    import lightning as L
    from hydra.utils import instantiate

    from zephyr_lit.models import load_tokenizer
    from zephyr_lit.run import build_module

    w = Workload.from_dict(job["workload"])
    kind, options = job["case"]["kind"], job["case"]["ours"]
    work_dir = Path(job["work_dir"])
    cfg = compose_ours(w, kind, options, job["model_dir"], work_dir, job.get("ours_overrides", []))
    L.seed_everything(cfg.seed, workers=True)

    spec = instantiate(cfg.model)
    tokenizer = load_tokenizer(spec)
    datamodule, micro_batches, train_rows = build_data(w, kind, options, job["rows"], tokenizer.pad_token_id,
                                           cfg.data.pad_to_multiple_of)
    module = build_module(cfg, spec, tokenizer, exact_match=[], datamodule=datamodule)

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if options.get("peft") == "lora":  # the adapter exists now (configure_model): the shared start values
                load_lora_init(pl_module, w)
            recorder.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            rows = batch["index"].numel() if "index" in batch else batch["bench_sequences"]
            recorder.micro(int(batch["num_tokens"]), rows, float(loss))
            if (batch_idx + 1) % w.accumulate == 0 or batch_idx + 1 == micro_batches:
                recorder.step_end()

    trainer = instantiate(
        cfg.trainer,
        accelerator="gpu" if job["device"] == "cuda" else "cpu",
        devices=1,
        num_nodes=1,
        strategy="auto",
        logger=False,
        callbacks=[Record()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        max_epochs=1,
        max_steps=-1,
    )
    trainer.fit(module, datamodule=datamodule)
    return {
        "precision": str(trainer.precision),
        "gradient_clip_val": trainer.gradient_clip_val,
        "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
        "pad_to_multiple_of": cfg.data.pad_to_multiple_of,
        "length_groups": cfg.module.get("length_groups", 1),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "overrides": job.get("ours_overrides", []),
        "micro_batches": micro_batches,
        "train_rows": train_rows,
    }
