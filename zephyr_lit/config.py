"""Config resolvers and the up-front config check (every problem reported at once)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from zephyr_lit.adapters import METHODS, QUANT_TYPES, missing_packages
from zephyr_lit.data.load import looks_local
from zephyr_lit.data.validate import BAD_ROWS
from zephyr_lit.errors import ConfigError
from zephyr_lit.optimizers import optimizer_problems
from zephyr_lit.generations_log import generations_problems
from zephyr_lit.launch import run_stamp
from zephyr_lit.losses import check_loss_args
from zephyr_lit.models import ATTENTION_IMPLEMENTATIONS, DTYPES, check_attention
from zephyr_lit.nonfinite import POLICIES
from zephyr_lit.preemption import RESERVED_SIGNALS, signal_named
from zephyr_lit.schedule import SCHEDULES


def _asset(name: str) -> str:
    from zephyr_lit.assets import asset_path

    return asset_path(name)


def _smollm2(which: str) -> str:
    from zephyr_lit.distill.smollm2 import smollm2_part

    return smollm2_part(which)


def register_resolvers() -> None:
    """``${asset:tiny-mistral}``: absolute path of a file shipped in ``zephyr_lit/assets``.
    ``${smollm2:folder}`` / ``${smollm2:file}``: the installed SmolLM2-135M-Instruct GGUF (``distill/smollm2.py``).
    ``${run_stamp:}``: the run folder's name, the same on every rank (see ``zephyr_lit.launch``); cached
    in the config like ``${now:}``, so a sweep's jobs (submitit's too) see the value their sweep used."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)
    if not OmegaConf.has_resolver("smollm2"):
        OmegaConf.register_new_resolver("smollm2", _smollm2)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", lambda: run_stamp(), use_cache=True)


register_resolvers()


def config_problems(cfg: DictConfig) -> list[str]:
    """Every invalid value in ``cfg``, as ``key=value: what is wrong`` lines."""
    problems: list[str] = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append(f"{key}={OmegaConf.select(cfg, key)}: {why}")

    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(cfg.optim.scheduler in SCHEDULES, "optim.scheduler", f"must be one of {', '.join(SCHEDULES)}")
    need(cfg.data.max_length >= 16, "data.max_length", "must be >= 16")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(bool(cfg.data.path), "data.path", "must name a hub data set, a local folder or a file")
    need(
        cfg.model.attn_implementation in ATTENTION_IMPLEMENTATIONS,
        "model.attn_implementation",
        f"must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}",
    )
    need(cfg.trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
    need(
        OmegaConf.select(cfg, "trainer.limit_train_batches") in (None, 1, 1.0),
        "trainer.limit_train_batches",
        "must be 1.0: a cut epoch ends inside a window whose token count the sampler already fixed "
        "(use data.max_train_samples to train on fewer rows)",
    )
    need(
        cfg.trainer.max_steps > 0 or (cfg.trainer.max_epochs or 0) > 0,
        "trainer.max_epochs",
        "set trainer.max_epochs > 0 or trainer.max_steps > 0 (training would never end)",
    )
    problems += data_and_module_problems(cfg)
    if "dpo" in cfg:
        problems += dpo_problems(cfg)
    problems += peft_problems(cfg)
    problems += optimizer_problems(cfg)
    problems += timeout_problems(cfg)
    problems += preemption_problems(cfg)
    problems += nonfinite_problems(cfg)
    problems += generations_problems(OmegaConf.select(cfg, "callbacks.generations"))
    model_path = str(cfg.model.name_or_path)
    if looks_local(model_path) and not Path(model_path).expanduser().exists():
        fix = "run `python train.py +experiment=dsft` first, or set model.name_or_path" if "dsft" in model_path \
            else "set model.name_or_path to a hub name or an existing folder"
        problems.append(f"model.name_or_path={model_path}: no model there ({fix})")
    if not problems and cfg.model.attn_implementation == "flash_attention_2":
        try:
            check_attention(cfg.model.attn_implementation)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def dpo_problems(cfg: DictConfig) -> list[str]:
    dpo = cfg.dpo
    problems = [f"dpo: {p}" for p in check_loss_args(dpo.loss_type, dpo.beta, dpo.label_smoothing)]
    if dpo.ref.precompute and dpo.ref.sync_steps:
        problems.append(
            "dpo.ref.precompute=true with dpo.ref.sync_steps set: a synced reference moves, so its cached "
            "log-probs would go stale; use one or the other"
        )
    if dpo.ref.sync_steps is not None and dpo.ref.sync_steps < 1:
        problems.append(f"dpo.ref.sync_steps={dpo.ref.sync_steps}: must be >= 1 (or null)")
    if not 0 < dpo.ref.mixup_alpha <= 1:
        problems.append(f"dpo.ref.mixup_alpha={dpo.ref.mixup_alpha}: must be in (0, 1]")
    return problems


def peft_problems(cfg: DictConfig) -> list[str]:
    """``peft.*`` (``conf/peft/``): the adapter's values, its packages, and what it cannot be combined with."""
    peft = cfg.get("peft")
    method = peft.get("method", "none") if peft is not None else "none"
    if method == "none":
        return []
    if method not in METHODS:
        return [f"peft.method={method}: must be one of {', '.join(METHODS)} (use peft=lora or peft=qlora)"]
    problems = [f"peft={method}: {missing}"] if (missing := missing_packages(method)) else []
    checks = {
        "r": (isinstance(peft.r, int) and peft.r >= 1, "must be an integer >= 1"),
        "alpha": (peft.alpha > 0, "must be > 0"),
        "dropout": (0 <= peft.dropout < 1, "must be in [0, 1)"),
        "lr_scale": (peft.lr_scale > 0, "must be > 0"),
        "target_modules": (bool(peft.target_modules), "must be all-linear or a list of module names"),
    }
    if method == "qlora":
        checks["quant_type"] = (peft.quant_type in QUANT_TYPES, f"must be one of {', '.join(QUANT_TYPES)}")
        checks["compute_dtype"] = (peft.compute_dtype in DTYPES, f"must be one of {', '.join(DTYPES)}")
    problems += [f"peft.{key}={peft.get(key)}: {why}" for key, (ok, why) in checks.items() if not ok]
    if method == "qlora" and "DeepSpeed" in str(OmegaConf.select(cfg, "strategy._target_", default="")) \
            and OmegaConf.select(cfg, "strategy.config.zero_optimization.stage", default=None) == 3:
        problems.append("peft=qlora with DeepSpeed ZeRO-3: a 4-bit base cannot be built inside deepspeed.zero.Init "
                        "(ZeRO-3 partitions each weight as it is created); use peft=lora under ZeRO-3, or qlora with "
                        "strategy=auto or strategy=ddp")
    if "dpo" in cfg and cfg.dpo.ref.sync_steps is not None:
        problems.append(f"dpo.ref.sync_steps={cfg.dpo.ref.sync_steps} with peft={method}: the reference is the policy "
                        "with its adapter switched off, so it cannot follow the policy (TR-DPO); set "
                        "dpo.ref.sync_steps=null or peft=none")
    return problems


def data_and_module_problems(cfg: DictConfig) -> list[str]:
    """The data module's and the Lightning module's own values (their constructors trust them)."""
    data, module, problems = cfg.data, cfg.module, []
    if data.get("group_mega_batches", 1) < 1:
        problems.append(f"data.group_mega_batches={data.group_mega_batches}: must be >= 1")
    prompt = data.get("max_prompt_length")
    if prompt is not None and prompt < 2:
        problems.append(f"data.max_prompt_length={prompt}: must be >= 2 (BOS and one token) or null")
    elif prompt is not None and prompt >= data.max_length:
        problems.append(f"data.max_prompt_length={prompt}: must be < data.max_length={data.max_length} "
                        "(completions of a pair over data.max_length get max_length - max_prompt_length tokens)")
    for key in ("eval_batch_size", "pad_to_multiple_of"):
        if data.get(key) is not None and data.get(key) < 1:
            problems.append(f"data.{key}={data.get(key)}: must be >= 1 (or null)")
    if data.get("bad_rows", "error") not in BAD_ROWS:
        problems.append(f"data.bad_rows={data.bad_rows}: must be one of {', '.join(BAD_ROWS)}")
    if not 0 <= data.get("max_bad_fraction", 0) < 1:
        problems.append(f"data.max_bad_fraction={data.max_bad_fraction}: must be in [0, 1)")
    if data.get("num_workers", 0) < 0:
        problems.append(f"data.num_workers={data.num_workers}: must be >= 0")
    if module.get("length_groups", 1) < 1:
        problems.append(f"module.length_groups={module.length_groups}: must be >= 1 (1: one padded pass per batch)")
    for key in ("exact_match_batch_size", "exact_match_max_new_tokens"):
        if module.get(key, 1) < 1:
            problems.append(f"module.{key}={module.get(key)}: must be >= 1")
    every = OmegaConf.select(cfg, "callbacks.checkpoint.every_n_train_steps")
    if every is not None and every < 1:
        problems.append(f"callbacks.checkpoint.every_n_train_steps={every}: must be >= 1 (or null: at validation)")
    dtype = cfg.model.get("dtype", "float32")
    if dtype not in DTYPES:
        problems.append(f"model.dtype={dtype}: must be one of {', '.join(DTYPES)}")
    return problems


def nonfinite_problems(cfg: DictConfig) -> list[str]:
    policy, limit = cfg.module.get("nonfinite", "stop"), cfg.module.get("max_skipped_steps", 10)
    problems = []
    if policy not in POLICIES:
        problems.append(f"module.nonfinite={policy}: must be one of {', '.join(POLICIES)}")
    if limit is None or limit < 0:
        problems.append(f"module.max_skipped_steps={limit}: must be >= 0")
    if policy == "skip" and "DeepSpeed" in str(cfg.strategy.get("_target_", "")):
        problems.append(
            "module.nonfinite=skip: DeepSpeed applies the step inside its engine, where a step cannot be "
            "skipped; use module.nonfinite=stop under DeepSpeed (resume from the last checkpoint with a lower lr)"
        )
    return problems


def preemption_problems(cfg: DictConfig) -> list[str]:
    """``callbacks.preemption``: a signal its handler can catch (not SIGTERM, which stops without requeueing),
    and two exit codes that tell "requeued" and "stopped" apart from success (0), errors (1) and usage errors (2)."""
    preemption = OmegaConf.select(cfg, "callbacks.preemption")
    if preemption is None:
        return []
    problems = []
    name = preemption.get("requeue_signal")
    if signal_named(name) in (None, *RESERVED_SIGNALS):
        problems.append(f"callbacks.preemption.requeue_signal={name}: must name a signal a handler can catch, other "
                        "than SIGTERM and SIGINT, e.g. SIGUSR1 (as in #SBATCH --signal=USR1@600)")
    codes = {key: preemption.get(key) for key in ("requeue_exit_code", "stop_exit_code")}
    for key, code in codes.items():
        if not (isinstance(code, int) and 3 <= code <= 255):
            problems.append(f"callbacks.preemption.{key}={code}: must be an integer in 3..255 (0 is success, 1 an "
                            "error, 2 a usage error)")
    if codes["requeue_exit_code"] == codes["stop_exit_code"]:
        problems.append(f"callbacks.preemption.stop_exit_code={codes['stop_exit_code']}: must differ from "
                        "requeue_exit_code, so that a requeued job and a stopped one can be told apart")
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise one ``ConfigError`` listing every problem, before any data or model is touched."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def timeout_problems(cfg: DictConfig) -> list[str]:
    """``strategy.timeout`` (DDP, DeepSpeed): a positive ``datetime.timedelta`` config, or null (Lightning's
    default, 30 min). Every collective that waits longer fails on that rank."""
    node = OmegaConf.select(cfg, "strategy.timeout") if isinstance(cfg.get("strategy"), DictConfig) else None
    if node is None:
        return []
    fix = "set it as {_target_: datetime.timedelta, minutes: 30}"
    if not isinstance(node, DictConfig) or node.get("_target_") != "datetime.timedelta":
        return [f"strategy.timeout={node}: must be a datetime.timedelta config ({fix})"]
    from hydra.utils import instantiate

    try:
        timeout = instantiate(node)
    except Exception as error:  # a bad keyword: hydra's message names it
        return [f"strategy.timeout: {error.__cause__ or error} ({fix})"]
    if timeout.total_seconds() <= 0:
        return [f"strategy.timeout={timeout}: must be > 0, or every collective fails at once ({fix})"]
    return []
