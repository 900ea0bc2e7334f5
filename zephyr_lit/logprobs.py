"""Per-token log-probabilities and summed negative log-likelihood, in fp32, with shifted labels.

Position ``t`` of the logits predicts token ``t + 1``; labels of -100 are masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zephyr_lit.data.tokenize import IGNORE_INDEX


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align predictions with targets: ``(B, T, V), (B, T) -> (B, T-1, V), (B, T-1)``."""
    return logits[:, :-1, :], labels[:, 1:]


def summed_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``-log p(label)`` over unmasked targets, and their count.

    Shapes: logits ``(B, T, V)``, labels ``(B, T)``; returns two scalars. Cross-entropy runs in fp32.
    """
    logits, targets = shifted(logits, labels)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()
