"""The model's replies to a few held-out prompts at every validation: ``generations.jsonl`` and a W&B Table.

The prompts are the first ``num_prompts`` usable rows of the data module's test split (``data.test_split``):
each row's conversation (``messages``, or ``chosen`` for preference rows) up to its first assistant turn.
They are fixed for the whole run, so the rows of one prompt show how its reply changes with the steps.

Replies go through the one generation path (``evaluation.greedy_replies``: greedy, the chat template,
left padding). Every rank makes the same ``generate`` calls on all the prompts (under ZeRO-3 each call
gathers the shards on every rank, ``synced_gpus``); rank 0 appends one line per prompt,
``{"step", "prompt", "reply", "messages"}``, to ``path`` in one write (``loggers.append_lines``: a kill
never leaves half a line, a resumed run appends), and logs every row of this fit so far as the table
``val/generations`` (columns ``step, prompt, reply``) to each logger that has ``log_table`` (W&B).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from zephyr_lit.evaluation import greedy_replies
from zephyr_lit.loggers import append_lines

log = logging.getLogger(__name__)

TABLE_KEY = "val/generations"
COLUMNS = ["step", "prompt", "reply"]
CONVERSATION_FIELDS = ("messages", "chosen")  # SFT rows, preference rows


def prompt_turns(row: dict) -> list[dict] | None:
    """The turns of ``row``'s conversation before its first assistant turn, when they end with a user
    turn (a prompt to answer); None for a row without one."""
    for name in CONVERSATION_FIELDS:
        messages = row.get(name)
        if not isinstance(messages, list):
            continue
        turns = []
        for message in messages:
            if not isinstance(message, dict) or message.get("role") == "assistant":
                break
            turns.append({"role": message.get("role"), "content": message.get("content")})
        if turns and turns[-1]["role"] == "user" and all(isinstance(t["content"], str) for t in turns):
            return turns
    return None


def held_out_prompts(rows, limit: int) -> list[list[dict]]:
    """The first ``limit`` prompts (``prompt_turns``) of ``rows``, skipping rows without one."""
    prompts = []
    for row in rows:
        turns = prompt_turns(row)
        if turns is not None:
            prompts.append(turns)
            if len(prompts) == limit:
                break
    return prompts


class GenerationsLog(L.Callback):
    """``callbacks.generations``: ``path`` (the JSON-lines file), ``num_prompts``, ``max_new_tokens``
    and ``batch_size`` (prompts per ``generate`` call)."""

    def __init__(self, path: str, num_prompts: int = 4, max_new_tokens: int = 32, batch_size: int = 8) -> None:
        self.path = Path(path)
        self.num_prompts, self.max_new_tokens, self.batch_size = num_prompts, max_new_tokens, batch_size
        self.prompts: list[list[dict]] = []
        self.rows: list[dict] = []  # this fit's rows, for the table

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the prompts once (every rank: each generates them all)."""
        datamodule = trainer.datamodule
        if self.prompts or datamodule is None or not hasattr(datamodule, "test_split"):
            return
        split = datamodule.load(datamodule.test_split, None)
        self.prompts = held_out_prompts(split.dataset, self.num_prompts)
        if not self.prompts:
            log.warning("%s split '%s': no row with a user prompt; no generations are logged",
                        split.source, split.name)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.prompts:
            return
        replies = greedy_replies(pl_module.trained_model, pl_module.tokenizer, self.prompts,
                                 self.max_new_tokens, self.batch_size)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        rows = [{"step": step, "prompt": turns[-1]["content"], "reply": reply, "messages": turns}
                for turns, reply in zip(self.prompts, replies)]
        append_lines(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.rows += rows
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key=TABLE_KEY, columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in self.rows],
                                 step=step)


def generations_problems(node: DictConfig | None) -> list[str]:
    """``callbacks.generations`` values that cannot work, as ``key=value: why`` lines (for ``config_problems``)."""
    if node is None:
        return []
    problems = []
    for key in ("num_prompts", "max_new_tokens", "batch_size"):
        value = node.get(key, 1)
        if not isinstance(value, int) or value < 1:
            problems.append(f"callbacks.generations.{key}={value}: must be an integer >= 1 "
                            "(callbacks.generations=null turns the generations off)")
    return problems
