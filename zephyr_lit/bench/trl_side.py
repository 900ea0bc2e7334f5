"""TRL's side of one benchmark run: ``DPOTrainer`` / ``SFTTrainer`` on the workload's token rows.

Both models come from ``zephyr_lit.models.build_model`` with the same spec and seed as ours, so
TRL starts from our exact weights; the reference model (when the case has one) is a second
identical build, passed explicitly, as is the tokenizer. Every run is fp32 with gradient
checkpointing off (TRL's defaults are bf16 autocast and gradient checkpointing on). The LoRA case
passes ``peft_config`` and no reference model: TRL then wraps the policy and computes the reference
with its adapter disabled.

Data: DPO gets ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns, and ``_prepare_dataset``
is skipped (TRL 1.16 would otherwise try to extract and tokenise text prompts; the rows are token
ids already and fit ``max_length``). SFT gets ``input_ids`` and ``labels`` columns, which TRL
recognises as processed data (it then only truncates, filters and, with packing, packs them).
"""

from __future__ import annotations

from pathlib import Path

from zephyr_lit.bench.lora import load_lora_init, trl_peft_config
from zephyr_lit.bench.measure import StepRecorder
from zephyr_lit.bench.workload import Workload


def real_tokens(inputs: dict) -> int:
    """Non-pad tokens of a collated TRL batch: the attention mask's sum, or every position of a
    padding-free batch (TRL pads those only to ``pad_to_multiple_of``, None off Neuron)."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


def sequences(inputs: dict) -> int:
    """Sequences in a collated TRL SFT batch: its rows, or the restarts of a padding-free row's positions."""
    if "attention_mask" in inputs or "position_ids" not in inputs:
        return int(inputs["input_ids"].size(0))
    return int((inputs["position_ids"] == 0).sum())


def _models(job: dict, with_reference: bool):
    import contextlib

    import torch

    from zephyr_lit.models import ModelSpec, build_model

    w = Workload.from_dict(job["workload"])
    spec = ModelSpec(name_or_path=job["model_dir"], dtype=w.dtype, attn_implementation=w.attn,
                     gradient_checkpointing=False, random_init=True, init_seed=w.seed)
    # Lightning builds ours inside the strategy's device context: on a GPU the weights are drawn there
    where = torch.device("cuda") if job["device"] == "cuda" else contextlib.nullcontext()
    with where:
        policy = build_model(spec)
        reference = build_model(spec) if with_reference else None
    return policy, reference


def _common_args(w: Workload, job: dict, options: dict, batch_size: int) -> dict:
    args = {
        "output_dir": str(Path(job["work_dir"]) / "trl"),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": w.accumulate,
        "learning_rate": w.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": w.seed,
        "use_cpu": job["device"] != "cuda",
        "dataloader_num_workers": 0,
    }
    if w.steps is None:
        args["num_train_epochs"] = 1
    else:
        args["max_steps"] = w.steps
    if options.get("sampler") == "sequential":
        args["train_sampling_strategy"] = "sequential"
    if options.get("optim", "default") != "default":
        args["optim"] = options["optim"]
    return args


def _callback(recorder: StepRecorder):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.start()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.step_end()

    return Record()


def run_trl(job: dict, recorder: StepRecorder) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    w = Workload.from_dict(job["workload"])
    kind, options = job["case"]["kind"], job["case"]["trl"]
    if w.dtype != "float32":
        raise ValueError("the benchmark compares fp32 runs only (dtype=float32)")
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = job["rows"]

    lora = options.get("peft") == "lora"
    if kind == "dpo":
        policy, reference = _models(job, with_reference=bool(options.get("ref_model")))
        dataset = Dataset.from_dict({
            "prompt_ids": [r["prompt_input_ids"] for r in rows],
            "chosen_ids": [r["chosen_input_ids"] for r in rows],
            "rejected_ids": [r["rejected_input_ids"] for r in rows],
        })
        args = trl.DPOConfig(
            **_common_args(w, job, options, w.pair_batch),
            beta=w.beta,
            loss_type=[w.loss_type],
            max_length=w.max_length,
            precompute_ref_log_probs=bool(options.get("precompute")),
            precompute_ref_batch_size=w.pair_batch,
        )

        class BenchDPOTrainer(trl.DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # token ids already

            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                inputs = args[1] if len(args) > 1 else kwargs["inputs"]
                recorder.micro(real_tokens(inputs), inputs["input_ids"].size(0) // 2, float(loss))
                return loss

        trainer = BenchDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[_callback(recorder)],
                                  peft_config=trl_peft_config(w) if lora else None)
        if lora:  # the adapter exists now (TRL wrapped the policy): the shared start values
            load_lora_init(trainer.model, w)
    else:
        policy, _ = _models(job, with_reference=False)
        dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                     "labels": [r["labels"] for r in rows]})
        padding_free, packing = bool(options.get("padding_free")), bool(options.get("packing"))
        args = trl.SFTConfig(
            **_common_args(w, job, options, w.sft_batch),
            # padding-free without packing does not enforce max_length (TRL refuses one): rows fit already
            max_length=None if padding_free and not packing else w.max_length,
            packing=packing,
            padding_free=padding_free,
        )

        class BenchSFTTrainer(trl.SFTTrainer):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                inputs = args[1] if len(args) > 1 else kwargs["inputs"]
                recorder.micro(real_tokens(inputs), sequences(inputs), float(loss))
                return loss

        trainer = BenchSFTTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=[_callback(recorder)])
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    return {
        "trl_version": trl.__version__,
        "optimizer": type(optimizer).__name__,
        "optimizer_fused": bool(optimizer.defaults.get("fused")),
        "sampler": trainer.args.train_sampling_strategy,
        "pad_to_multiple_of": trainer.args.pad_to_multiple_of,
        "train_rows": len(trainer.train_dataset),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
