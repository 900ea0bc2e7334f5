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


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label)`` of the shifted labels, in fp32, and the mask of labelled targets.

        logp[b, t] = logits[b, t, y] - logsumexp_v logits[b, t, v],   y = labels[b, t + 1]

    Masked targets (-100) are gathered at index 0 and then set to 0 in ``logp``. The log-softmax is
    never materialised: each batch row gathers the label logit and takes a ``logsumexp`` over the
    vocabulary, so at most one row of the logits exists in fp32 at a time in the forward pass.

    Shape: logits ``(B, T, V)`` (any float dtype), labels ``(B, T)``; returns ``logp`` ``(B, T-1)``
    fp32 and ``mask`` ``(B, T-1)`` bool.
    """
    logits, targets = shifted(logits, labels)  # (B, T-1, V), (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    safe = targets.masked_fill(~mask, 0).unsqueeze(-1)  # (B, T-1, 1): never gather at -100
    rows = []
    for row, idx in zip(logits, safe):  # row (T-1, V), idx (T-1, 1): chunk over the batch
        picked = row.gather(-1, idx).squeeze(-1).float()  # (T-1,)
        rows.append(picked - row.float().logsumexp(-1))  # (T-1,)
    logp = torch.stack(rows)  # (B, T-1)
    return logp.masked_fill(~mask, 0.0), mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each row's labelled tokens: their sum, or their mean when ``average``.

        sum:  sum_t mask[b, t] * logp[b, t]
        mean: sum_t mask[b, t] * logp[b, t] / max(1, sum_t mask[b, t])

    A fully masked row gives 0 in both cases (not NaN). DPO uses the sum; IPO the mean.

    Shape: logits ``(B, T, V)``, labels ``(B, T)``; returns ``(B,)`` fp32.
    """
    logp, mask = token_logprobs(logits, labels)  # (B, T-1), (B, T-1)
    total = logp.sum(-1)  # (B,); masked entries are already 0
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


def masked_logit_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean raw logit over labelled (completion) positions and the whole vocabulary, in fp32.

        mean = sum_{b,t} mask[b, t] * sum_v logits[b, t, v] / (V * max(1, sum_{b,t} mask[b, t]))

    with the shifted mask (position ``t`` predicts label ``t + 1``). This is TRL's ``logits/chosen``
    (``logits[mask].mean()`` over the shifted completion mask); since every position has ``V``
    entries it is also the mean over completion positions of the per-position mean logit. Unlike
    TRL, no labelled position gives 0 rather than NaN. The result keeps its graph; detach it
    (``LightningModule.log`` does) when logging.

    Shape: logits ``(B, T, V)``, labels ``(B, T)``; returns a scalar.
    """
    logits, targets = shifted(logits, labels)  # (B, T-1, V), (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    per_position = logits.sum(-1, dtype=torch.float32)  # (B, T-1), no fp32 copy of the logits
    total = per_position.masked_fill(~mask, 0.0).sum()
    return total / (mask.sum().clamp(min=1) * logits.size(-1))
