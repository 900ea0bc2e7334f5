"""Pairwise preference losses (DPO and relatives) as pure functions of per-sequence log-probs.

Every loss here is a function of one number per pair, the implicit reward margin

    logits = (pi_c - pi_r) - (ref_c - ref_r)

where ``pi_c``/``pi_r`` are the policy's log-probs of the chosen/rejected completion and
``ref_c``/``ref_r`` the frozen reference model's. The loss names and formulas follow TRL's
``DPOTrainer.dpo_loss`` for the same ``loss_type`` strings, so a config written for TRL means
the same thing here. Everything is computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F


class LossType(str, Enum):
    """Names of the supported preference losses (the strings TRL uses for ``loss_type``)."""

    SIGMOID = "sigmoid"
    ROBUST = "robust"
    IPO = "ipo"
    HINGE = "hinge"


@dataclass(frozen=True)
class DPOOutput:
    """Per-pair losses and the (detached) implicit rewards.

    ``losses`` carries gradients; reduce it (usually ``.mean()``) yourself. The rewards are
    ``beta * (policy_logps - reference_logps)`` and are detached: they are for logging
    (``rewards/chosen``, ``rewards/margins``, ``rewards/accuracies``).

    Shape: each field ``(B,)``.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def check_loss_args(loss_type: str, beta: float, label_smoothing: float) -> list[str]:
    """Human-readable problems with a loss configuration; an empty list means it is valid.

    Checks that ``loss_type`` is one of :class:`LossType`, ``beta > 0`` and
    ``0 <= label_smoothing < 0.5`` (at 0.5 the preference label is a coin flip, and the robust
    loss divides by ``1 - 2 * label_smoothing``).
    """
    problems: list[str] = []
    valid = [t.value for t in LossType]
    if loss_type not in valid:
        problems.append(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(valid)}")
    if not beta > 0:
        problems.append(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        problems.append(f"DPO label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    return problems


def preference_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """The implicit reward margin ``(pi_c - pi_r) - (ref_c - ref_r)``, in fp32.

    Shape: each argument ``(B,)``; returns ``(B,)``.
    """
    pi_logratios = policy_chosen_logps.float() - policy_rejected_logps.float()
    ref_logratios = reference_chosen_logps.float() - reference_rejected_logps.float()
    return pi_logratios - ref_logratios


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), conservative DPO (cDPO) when ``eps > 0``.

        loss = -(1 - eps) * log sigmoid(beta * logits) - eps * log sigmoid(-beta * logits)

    With ``eps = label_smoothing``: the Bradley-Terry negative log-likelihood of the preference,
    with the label flipped with probability ``eps``. At ``logits = 0`` it is ``ln 2`` for any beta.

    Shape: logits ``(B,)``; returns ``(B,)``.
    """
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)


def robust_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409).

        loss = (-(1 - eps) * log sigmoid(beta * logits) + eps * log sigmoid(-beta * logits)) / (1 - 2 * eps)

    An unbiased estimator of the clean-label DPO loss when labels are flipped with probability
    ``eps = label_smoothing`` (note the ``+`` on the second term, unlike cDPO). Equals
    :func:`sigmoid_loss` at ``eps = 0``. Requires ``eps < 0.5``.

    Shape: logits ``(B,)``; returns ``(B,)``.
    """
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", arXiv:2310.12036, eq. 17).

        loss = (logits - 1 / (2 * beta)) ** 2

    ``beta`` plays the role of the paper's regulariser ``tau``. IPO is meant to be used with
    length-averaged log-probs (``sequence_logprobs(..., average=True)``), as in TRL; with summed
    log-probs the target margin ``1 / (2 beta)`` is tiny next to the sums. At ``logits = 0`` it is
    ``1 / (4 beta^2)``.

    Shape: logits ``(B,)``; returns ``(B,)``.
    """
    return (logits - 1 / (2 * beta)) ** 2


def hinge_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425).

        loss = relu(1 - beta * logits)

    ``1 / beta`` is the margin (the paper's ``delta``). At ``logits = 0`` it is 1.

    Shape: logits ``(B,)``; returns ``(B,)``.
    """
    return torch.relu(1 - beta * logits)


def dpo_loss(
    loss_type: LossType | str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Per-pair preference loss of the chosen ``loss_type`` and the detached implicit rewards.

    ``logits = (pi_c - pi_r) - (ref_c - ref_r)``; the loss is one of :func:`sigmoid_loss`,
    :func:`robust_loss`, :func:`ipo_loss`, :func:`hinge_loss` (``label_smoothing`` is used by
    ``sigmoid`` and ``robust`` only, as in TRL). Rewards are ``beta * (pi - ref)``.

    Shape: each log-prob argument ``(B,)`` (summed, or averaged, per-sequence log-probs; any
    float dtype, computed in fp32). Every field of the result is ``(B,)``.

    Raises ``ValueError`` for an unknown ``loss_type``.
    """
    kind = LossType(loss_type)
    logits = preference_logits(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    if kind is LossType.SIGMOID:
        losses = sigmoid_loss(logits, beta, label_smoothing)
    elif kind is LossType.ROBUST:
        losses = robust_loss(logits, beta, label_smoothing)
    elif kind is LossType.IPO:
        losses = ipo_loss(logits, beta)
    else:
        losses = hinge_loss(logits, beta)

    chosen_rewards = beta * (policy_chosen_logps.float() - reference_chosen_logps.float()).detach()
    rejected_rewards = beta * (policy_rejected_logps.float() - reference_rejected_logps.float()).detach()
    return DPOOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
