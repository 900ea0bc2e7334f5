"""Pure tokenisation for SFT: a conversation to ids and labels; packing of several into one row.

Labels use -100 for positions that are not trained. Masking is by position (from character
spans), never by token id: pad = eos, so masking the id would also mask every closing ``</s>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from zephyr_lit.chat import render

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def label_positions(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens whose first character lies inside one of the ``[start, end)`` spans.

    Special tokens added by the tokenizer (BOS) have the empty offset ``(0, 0)`` and are never labelled.
    """
    inside = []
    for start, end in offsets:
        inside.append(end > start and any(s <= start < e for s, e in spans))
    return inside


def tokenize_conversation(
    messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    assistant_only_loss: bool = True,
) -> Tokenized:
    """Render ``messages`` with the Zephyr template and tokenise once (BOS added by the tokenizer).

    Labels: the assistant contents and their closing ``</s>`` (``assistant_only_loss``), else every
    token. The first token is never a label (nothing predicts it). Longer conversations are cut
    to ``max_length`` tokens on the right, as TRL does.
    """
    rendered = render(messages, tokenizer.eos_token)
    encoding = tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=True)
    ids: list[int] = encoding["input_ids"]
    if assistant_only_loss:
        keep = label_positions(encoding["offset_mapping"], rendered.assistant_spans)
        labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]
    else:
        labels = list(ids)
    labels[0] = IGNORE_INDEX
    truncated = len(ids) > max_length
    return Tokenized(ids[:max_length], labels[:max_length], truncated)


def pack_sequences(
    input_ids: list[list[int]], labels: list[list[int]], max_length: int
) -> dict[str, list[list[int]]]:
    """Pack whole examples, in order, into rows of at most ``max_length`` tokens.

    Each row has ``position_ids`` that restart at 0 for every example, which is how the attention
    keeps examples apart (transformers derives a block-diagonal causal mask from them).
    An example's first label is already ignored, so no loss crosses a boundary.
    """
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labs in zip(input_ids, labels):
        if not rows["input_ids"] or len(rows["input_ids"][-1]) + len(ids) > max_length:
            for column in rows.values():
                column.append([])
        rows["input_ids"][-1].extend(ids)
        rows["labels"][-1].extend(labs)
        rows["position_ids"][-1].extend(range(len(ids)))
    return rows
