"""The Zephyr chat format, rendered in Python and as a Jinja chat template that agree exactly.

One turn is ``<|role|>\\n{content}</s>\\n``; the generation prompt is ``<|assistant|>\\n``.
A conversation that does not open with a system turn gets an empty one
(``<|system|>\\n</s>\\n``), as the alignment-handbook recipe does. BOS is never part of the
text: the tokenizer adds it when it encodes, exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")

ZEPHYR_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|system|>\n' + eos_token + '\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and the character spans ``[start, end)`` that are trained on.

    Each assistant span covers the turn's content and its closing EOS, not the
    ``<|assistant|>\\n`` tag and not the newline after EOS.
    """

    text: str
    assistant_spans: list[tuple[int, int]]


def with_system_turn(messages: list[dict]) -> list[dict]:
    """Return ``messages`` with an empty system turn in front when it has none."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": ""}, *messages]


def render(messages: list[dict], eos_token: str, add_generation_prompt: bool = False) -> Rendered:
    """Render ``messages`` in the Zephyr format; identical to ``ZEPHYR_CHAT_TEMPLATE``."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for message in with_system_turn(messages):
        tag = f"<|{message['role']}|>\n"
        body = message["content"] + eos_token
        if message["role"] == "assistant":
            spans.append((length + len(tag), length + len(tag) + len(body)))
        turn = tag + body + "\n"
        parts.append(turn)
        length += len(turn)
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return Rendered("".join(parts), spans)
