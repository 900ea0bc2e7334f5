"""Parity with TRL: our DPO maths gives the same losses and rewards as TRL's ``DPOTrainer``.

Both sides start from the same four text rows of the embedded UltraFeedback-style test split (a
single-turn row, a row with a system turn, a multi-turn row, a row whose completions differ in
length; none needs truncation) and the same two models: the reference is the random-init tiny
Mistral, the policy a copy of it with seeded noise added to every weight, so that the rewards are
far from zero. Both are fp32 with no dropout.

- **Ours**: ``PreferenceDataModule`` tokenises the rows and ``collate_pairs`` builds the ``(2B, T)``
  batch; ``sequence_logprobs`` (summed, or averaged where ``DPOSettings.average`` says so, i.e. for
  IPO) on each model's logits; ``dpo_loss``.
- **TRL** (1.16): ``DPOTrainer`` gets the raw ``chosen``/``rejected`` message lists (its
  ``extract_prompt`` splits off the shared prompt turns), tokenises them itself through the
  tokenizer's chat template, collates with its own collator, runs both models with its fused LM
  head, and reports through ``DPOTrainer.evaluate()`` (one eval batch holding all rows, no
  training step). Its per-example log-probs come from ``DPOTrainer.compute_ref_log_probs`` applied
  to the policy and to the reference on a batch of its own eval loader.

Compared, to 1e-5: the mean loss, the mean chosen/rejected rewards, the margins and accuracies,
``logps/*`` and ``logits/*``, and every example's summed log-probs under both models (hence every
example's rewards). A separate test checks TRL's token ids and batch against ours (checked, never
handed to TRL), so that a tokenisation drift is reported as such rather than as a loss mismatch.

Loss types: the ones both sides have. TRL 1.16 has ``sigmoid``, ``robust``, ``ipo`` and ``hinge``;
``label_smoothing`` is used by its ``robust`` loss only (robust DPO, same formula as ours), so
robust is also run with ``label_smoothing > 0``. Our ``sigmoid`` with ``label_smoothing > 0``
(conservative DPO, as TRL < 1.0 had it) has no TRL 1.16 counterpart: its sigmoid loss ignores
``label_smoothing``.

Convention mappings (the TRL side's chat template, ``TRL_CHAT_TEMPLATE``, differs from
``ZEPHYR_CHAT_TEMPLATE`` in exactly these two places; ``test_trl_template_renders_our_text``
pins the rendered text):

1. **BOS.** We render the text without BOS and let the tokenizer add it when encoding (so the
   SentencePiece-style ``Metaspace`` pre-tokenizer also puts its ``▁`` dummy prefix on the first
   piece: ``<s> ▁<|system|>``). TRL encodes conversations with ``apply_chat_template(tokenize=True)``,
   which never adds special tokens: the template must write BOS. A bare ``{{ bos_token }}`` would
   give ``<s> <| system|>`` (no dummy prefix after a special token, so other ids), hence
   ``bos_token + ' '``: the space becomes that ``▁``, and the ids equal ours.
2. **The newline after the last EOS.** Zephyr turns end in ``</s>\\n``. Our completion is the
   assistant content plus ``</s>``: generation stops at EOS, so the ``\\n`` after it is never
   trained on. TRL labels everything the template renders after the prompt, so the TRL template
   leaves out the ``\\n`` after the final turn (every earlier turn keeps it).

Where the assistant tag goes needs no mapping: on both sides ``<|assistant|>\\n`` belongs to the
prompt (TRL renders the prompt with ``add_generation_prompt=True`` and takes the completion where
the prompt and prompt+completion ids diverge; we cut at the first token starting after the prompt
text).

One reporting difference, in the metrics only: TRL 1.16's IPO divides the summed log-ratios by the
completion length inside the loss, but logs ``rewards/*`` and ``logps/*`` from the summed
log-probs, as for every other loss. Our module (like TRL < 1.0) feeds averaged log-probs to IPO, so
its IPO rewards are ``beta *`` the averaged log-ratios. The IPO losses agree; the IPO rewards are
compared with ``dpo_loss``'s rewards on our summed log-probs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from zephyr_lit.assets import PREF_DATA, TINY_MODEL, asset_path  # noqa: E402
from zephyr_lit.chat import render  # noqa: E402
from zephyr_lit.data.preference import PreferenceDataModule  # noqa: E402
from zephyr_lit.logprobs import masked_logit_mean, sequence_logprobs  # noqa: E402
from zephyr_lit.losses import dpo_loss  # noqa: E402
from zephyr_lit.models import ModelSpec, build_model, load_tokenizer  # noqa: E402
from zephyr_lit.modules.dpo import DPOSettings  # noqa: E402

ROWS = 4  # the first rows of test_prefs: one turn, a system turn, two turns, completions of different lengths
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512
TOL = 1e-5

# ZEPHYR_CHAT_TEMPLATE with the two convention mappings of the module docstring: BOS (and the
# dummy-prefix space) written by the template; no "\n" after the final turn of a conversation
# rendered without a generation prompt.
TRL_CHAT_TEMPLATE = (
    "{{ bos_token + ' ' }}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|system|>\n' + eos_token + '\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# transformers 5.x renamed `gradient_checkpointing` (TRL's default: on) to `activation_checkpointing`.
CHECKPOINTING = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                     if name in {f.name for f in dataclasses.fields(trl.DPOConfig)})

# (loss_type, beta, label_smoothing): every loss type both sides have.
CASES = [
    ("sigmoid", 0.1, 0.0),
    ("robust", 0.1, 0.0),
    ("robust", 0.1, 0.2),
    ("ipo", 0.1, 0.0),
    ("hinge", 0.1, 0.0),
]


# ---- shared inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name_or_path=asset_path(TINY_MODEL)))


@pytest.fixture(scope="module")
def trl_tokenizer(tokenizer):
    trl_side = copy.deepcopy(tokenizer)
    trl_side.chat_template = TRL_CHAT_TEMPLATE
    return trl_side


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """The raw rows, as stored (UltraFeedback-binarized schema)."""
    path = Path(asset_path(PREF_DATA)) / "data" / "test_prefs-00000-of-00001.jsonl"
    with path.open() as handle:
        return [json.loads(next(handle)) for _ in range(ROWS)]


@pytest.fixture(scope="module")
def models():
    """``(reference, policy)``: the random-init tiny model, and a copy with seeded noise on every weight."""
    reference = build_model(ModelSpec(name_or_path=asset_path(TINY_MODEL), random_init=True, init_seed=0)).eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    for model in (reference, policy):
        model.requires_grad_(False)
        assert model.dtype == torch.float32 and not model.training
    return reference, policy


@pytest.fixture(scope="module")
def ours(tokenizer, models, hf_cache):
    """Our data path and log-probs: the tokenised split, the ``(2B, T)`` batch and per-sequence
    log-probs ``(2B,)`` (chosen rows, then rejected rows) of both models, summed and averaged."""
    datamodule = PreferenceDataModule(
        path=asset_path(PREF_DATA), cache_dir=str(hf_cache),
        max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, batch_size=ROWS,
        max_train_samples=ROWS, max_eval_samples=ROWS, shuffle=False,
    )
    datamodule.prepare(tokenizer)
    stats = datamodule.stats[datamodule.test_split]
    assert (stats.pairs, stats.truncated_prompts, stats.truncated_completions) == (ROWS, 0, 0)
    (batch,) = list(datamodule.val_dataloader())
    assert batch["index"].tolist() == list(range(ROWS))
    reference, policy = models
    out = {"rows": datamodule.val_set, "batch": batch}
    with torch.no_grad():
        for name, model in (("reference", reference), ("policy", policy)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            out[name] = {average: sequence_logprobs(logits, batch["labels"], average=average)
                         for average in (False, True)}
            out[f"{name}_logits"] = logits
    return out


def halves(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logps[:ROWS], logps[ROWS:]


def our_output(ours, loss_type: str, beta: float, label_smoothing: float, average: bool):
    """``dpo_loss`` on our log-probs, combined as ``DPOModule._step`` does."""
    policy_chosen, policy_rejected = halves(ours["policy"][average])
    reference_chosen, reference_rejected = halves(ours["reference"][average])
    return dpo_loss(loss_type, policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                    beta=beta, label_smoothing=label_smoothing)


def trl_dataset(rows: list[dict]) -> Dataset:
    """The same rows in TRL's implicit-prompt conversational preference format: the two message
    lists as stored (the ``prompt`` string column is redundant with them and would make the row
    mix plain text and conversations)."""
    return Dataset.from_list([{"chosen": row["chosen"], "rejected": row["rejected"]} for row in rows])


def make_trainer(models, trl_tokenizer, rows, output_dir: Path, loss_type="sigmoid", beta=0.1, label_smoothing=0.0):
    reference, policy = models
    args = trl.DPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        precompute_ref_log_probs=False,
        disable_dropout=True,
        loss_type=[loss_type],
        beta=beta,
        label_smoothing=label_smoothing,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=ROWS,
        per_device_eval_batch_size=ROWS,
        dataloader_num_workers=0,
        seed=0,
        **{CHECKPOINTING: False},
    )
    dataset = trl_dataset(rows)
    # Copies: TRL patches each model's forward (its fused LM head) and moves the pad id onto the config.
    return trl.DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
        train_dataset=dataset, eval_dataset=dataset, processing_class=trl_tokenizer,
    )


# ---- the tests -------------------------------------------------------------------------------
def test_trl_template_renders_our_text(tokenizer, trl_tokenizer, rows):
    """The TRL-side template gives our rendered text, up to the two mappings (BOS; final newline)."""
    prefix = tokenizer.bos_token + " "
    for row in rows:
        prompt, eos = row["chosen"][:-1], tokenizer.eos_token
        ours_prompt = render(prompt, eos, add_generation_prompt=True).text
        assert trl_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == prefix + ours_prompt
        for side in ("chosen", "rejected"):
            full = render(row[side], eos).text
            assert full == f"{ours_prompt}{row[side][-1]['content']}{eos}\n"
            assert trl_tokenizer.apply_chat_template(row[side], tokenize=False) == prefix + full.removesuffix("\n")


def test_trl_tokenises_the_rows_as_we_do(models, trl_tokenizer, rows, ours, tmp_path):
    trainer = make_trainer(models, trl_tokenizer, rows, tmp_path)
    tokenized = trainer.eval_dataset
    assert len(tokenized) == ROWS
    for mine, theirs in zip(ours["rows"], tokenized, strict=True):
        assert theirs["prompt_ids"] == mine["prompt_input_ids"]
        assert theirs["chosen_ids"] == mine["chosen_input_ids"]
        assert theirs["rejected_ids"] == mine["rejected_input_ids"]
        assert len(theirs["prompt_ids"]) + max(len(theirs["chosen_ids"]), len(theirs["rejected_ids"])) < MAX_LENGTH
    # Its batch is ours up to padding: both right-pad, TRL to the longest row, ours to a multiple of 8.
    batch = next(iter(trainer.get_eval_dataloader()))
    width = batch["input_ids"].shape[1]
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["input_ids"][mask], ours["batch"]["input_ids"][:, :width][mask])
    assert torch.equal(batch["completion_mask"].bool(), ours["batch"]["labels"][:, :width] != -100)


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing"), CASES, ids=lambda v: str(v))
def test_dpo_loss_and_rewards_match_trl(loss_type, beta, label_smoothing, models, trl_tokenizer, rows, ours, tmp_path):
    trainer = make_trainer(models, trl_tokenizer, rows, tmp_path, loss_type, beta, label_smoothing)
    metrics = trainer.evaluate()

    average = DPOSettings(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing).average
    assert average == (loss_type == "ipo")
    out = our_output(ours, loss_type, beta, label_smoothing, average)
    # TRL logs rewards/* and logps/* from summed log-probs for every loss type (see the docstring).
    summed = our_output(ours, loss_type, beta, label_smoothing, average=False)

    # Not a vacuous comparison: rewards clearly non-zero, the hinge active somewhere.
    assert summed.chosen_rewards.abs().min() > 1e-2 and summed.rejected_rewards.abs().min() > 1e-2
    assert out.losses.mean() > 1e-3

    policy_chosen, policy_rejected = halves(ours["policy"][False])
    labels = ours["batch"]["labels"]
    expected = {
        "loss": out.losses.mean(),
        "rewards/chosen": summed.chosen_rewards.mean(),
        "rewards/rejected": summed.rejected_rewards.mean(),
        "rewards/margins": (summed.chosen_rewards - summed.rejected_rewards).mean(),
        "rewards/accuracies": (summed.chosen_rewards > summed.rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen.mean(),
        "logps/rejected": policy_rejected.mean(),
        "logits/chosen": masked_logit_mean(ours["policy_logits"][:ROWS], labels[:ROWS]),
        "logits/rejected": masked_logit_mean(ours["policy_logits"][ROWS:], labels[ROWS:]),
    }
    for name, value in expected.items():
        assert metrics[f"eval_{name}"] == pytest.approx(float(value), abs=TOL), name

    # Per example: TRL's summed log-probs of the policy and of the reference, on its own batch.
    batch = next(iter(trainer.get_eval_dataloader()))
    trl_policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    trl_reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    torch.testing.assert_close(trl_policy, ours["policy"][False], rtol=0, atol=TOL)
    torch.testing.assert_close(trl_reference, ours["reference"][False], rtol=0, atol=TOL)
    trl_rewards = beta * (trl_policy - trl_reference)
    torch.testing.assert_close(trl_rewards, torch.cat([summed.chosen_rewards, summed.rejected_rewards]),
                               rtol=0, atol=TOL)
    if loss_type == "ipo":
        # The logged-reward convention differs; the loss does not (checked above).
        assert not torch.allclose(out.chosen_rewards, summed.chosen_rewards, atol=1e-3)
    else:
        assert torch.equal(out.chosen_rewards, summed.chosen_rewards)
