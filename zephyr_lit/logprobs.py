"""Per-token log-probabilities in fp32, with shifted labels: position ``t`` predicts token ``t + 1``;
labels of -100 are masked out.

The training steps use ``model_completion_scores`` (the LM head only at labelled positions); the
full-logits functions (``token_logprobs``, ``sequence_logprobs``, ``masked_logit_mean``) are its
fallback for models with soft-capped logits and the reference it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zephyr_lit.adapters import unwrap
from zephyr_lit.data.tokenize import IGNORE_INDEX


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align predictions with targets: ``(B, T, V), (B, T) -> (B, T-1, V), (B, T-1)``."""
    return logits[:, :-1, :], labels[:, 1:]


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


# ---- the LM head at the labelled positions only ----------------------------------------------
@dataclass
class CompletionScores:
    """Per-row results of ``completion_scores`` (``R`` rows): ``logp_sum`` (sum of the labelled
    tokens' log-probs, fp32, with graph), ``token_count``, and ``logit_sum`` (sum over labelled
    positions of the sum over the vocabulary of the raw logits, detached: for TRL's ``logits/*``)."""

    logp_sum: torch.Tensor  # (R,)
    token_count: torch.Tensor  # (R,)
    logit_sum: torch.Tensor  # (R,)
    vocab_size: int

    def logps(self, average: bool = False) -> torch.Tensor:
        """Per-row sum, or mean over the labelled tokens (0 for a row without any)."""
        return self.logp_sum / self.token_count.clamp(min=1) if average else self.logp_sum

    def logit_mean(self, rows: slice) -> torch.Tensor:
        """Mean raw logit over the labelled positions of ``rows`` and the vocabulary (0 if none)."""
        count = self.token_count[rows].sum().clamp(min=1)
        return self.logit_sum[rows].sum() / (count * self.vocab_size)

    def mean_nll(self, rows: slice) -> torch.Tensor:
        """Mean negative log-likelihood per labelled token of ``rows``."""
        return -self.logp_sum[rows].sum() / self.token_count[rows].sum().clamp(min=1)


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """``(body, lm_head)`` of a causal LM whose logits are exactly ``lm_head(body(...).last_hidden_state)``
    (Mistral, Llama, Qwen, ...), or None (soft-capped or scaled logits: use the full logits). A peft model
    is split inside, where its LoRA layers sit in the body (an adapted head is no plain ``Linear``: full logits)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    plain = not any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if isinstance(head, torch.nn.Linear) and isinstance(body, torch.nn.Module) and body is not model and plain:
        return body, head
    return None


def completion_scores(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk_tokens: int = 2048
) -> CompletionScores:
    """Log-probs of the labelled tokens from the last hidden states, applying ``head`` only where a
    label follows, ``chunk_tokens`` positions at a time:

        logp[n] = z[n, y_n] - logsumexp_v z[n, v],   z = head(hidden[b, t]) in fp32,  y_n = labels[b, t + 1]

    so no full ``(R, T, V)`` logits tensor (nor its fp32 copy) ever exists: memory and time scale with
    the number of labelled tokens, not with the padded length.

    Shapes: hidden ``(R, T, H)``, labels ``(R, T)`` (-100 = not scored).
    """
    targets = labels[:, 1:]  # (R, T-1)
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]  # (N,): the row of each labelled position
    picked_hidden = hidden[:, :-1][mask]  # (N, H)
    picked_targets = targets[mask]  # (N,)
    logps, logit_sums = [], []
    for start in range(0, picked_targets.numel(), chunk_tokens):
        logits = head(picked_hidden[start : start + chunk_tokens]).float()  # (n, V)
        target = picked_targets[start : start + chunk_tokens].unsqueeze(-1)  # (n, 1)
        logps.append(logits.gather(-1, target).squeeze(-1) - logits.logsumexp(-1))  # (n,)
        logit_sums.append(logits.detach().sum(-1))  # (n,)
    num_rows = labels.size(0)
    zeros = hidden.new_zeros(num_rows, dtype=torch.float32)
    token_logps = torch.cat(logps) if logps else zeros[:0]
    return CompletionScores(
        logp_sum=zeros.index_add(0, rows, token_logps),
        token_count=mask.sum(-1),
        logit_sum=zeros.detach().index_add(0, rows, torch.cat(logit_sums) if logit_sums else zeros[:0]),
        vocab_size=head.out_features,
    )


# ---- rows of similar length, each group trimmed to its own longest row -------------------------
def length_groups(lengths: list[int], max_groups: int, group_cost: float = 0.03) -> list[list[int]]:
    """Split the rows of a right-padded batch into at most ``max_groups`` groups of similar length.

    Rows are sorted by length (longest first) and cut into contiguous runs; run ``g`` is padded to
    its longest row ``L_g`` only, so it costs ``|g| * L_g`` token positions instead of ``|g| * T``.
    Among the cuts into ``k`` runs the one with the fewest padded positions ``P_k`` is found by
    dynamic programming (optimal: a partition by sorted length is never beaten by an unsorted one),
    and ``k`` minimises ``P_k * (1 + group_cost * (k - 1))``: each extra forward pass must save more
    than ``group_cost`` of the work. Returns the groups as lists of row indices, longest group first;
    ``[[0, ..., R-1]]`` (one pass) when splitting does not pay.
    """
    rows = len(lengths)
    if max_groups <= 1 or rows <= 1:
        return [list(range(rows))]
    order = sorted(range(rows), key=lambda i: -lengths[i])  # stable: ties keep batch order
    sorted_lengths = [lengths[i] for i in order]
    groups = min(max_groups, rows)
    inf = float("inf")
    # cost[k][j]: fewest padded positions for the first j sorted rows in k runs; cut[k][j]: where the last run starts
    cost = [[inf] * (rows + 1) for _ in range(groups + 1)]
    cut = [[0] * (rows + 1) for _ in range(groups + 1)]
    cost[0][0] = 0
    for k in range(1, groups + 1):
        for j in range(1, rows + 1):
            for i in range(k - 1, j):  # last run = sorted rows i..j-1, its longest is sorted_lengths[i]
                candidate = cost[k - 1][i] + (j - i) * sorted_lengths[i]
                if candidate < cost[k][j]:
                    cost[k][j], cut[k][j] = candidate, i
    best = min(range(1, groups + 1), key=lambda k: (cost[k][rows] * (1 + group_cost * (k - 1)), k))
    bounds, j = [], rows
    for k in range(best, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    return [order[i:j] for i, j in reversed(bounds)]


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each row's real length if every row is ``1 ... 1 0 ... 0`` (right padding), else None."""
    lengths = attention_mask.sum(-1)  # (R,)
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    prefix = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (R, T)
    if not torch.equal(attention_mask.bool(), prefix):
        return None
    return lengths.tolist()


def _one_pass(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> CompletionScores:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits  # (R, T, V)
        logp, mask = token_logprobs(logits, batch["labels"])
        masked = logits[:, :-1].sum(-1, dtype=torch.float32).detach().masked_fill(~mask, 0.0)
        return CompletionScores(logp.sum(-1), mask.sum(-1), masked.sum(-1), logits.size(-1))
    body, head = parts
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (R, T, H)
    return completion_scores(hidden, head, batch["labels"], chunk_tokens)


def model_completion_scores(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 2048, max_groups: int = 1
) -> CompletionScores:
    """``completion_scores`` for ``batch`` (``input_ids``, ``attention_mask`` and/or ``position_ids``,
    ``labels``) through ``model``; models whose logits are not a plain head fall back to full logits.

    ``max_groups > 1``: a right-padded batch (with ``attention_mask``) runs as up to that many passes
    over rows of similar length (``length_groups``), each cut to its longest row (rounded up to a
    multiple of 8 on CUDA). Under causal attention a row's log-probs do not depend on the padding after
    it, so the scores equal one padded pass (up to float rounding); the padded positions are not
    computed. Packed rows (``position_ids``, no mask) always run as one pass.
    """
    mask = batch.get("attention_mask")
    lengths = right_padded_lengths(mask) if max_groups > 1 and mask is not None and "position_ids" not in batch else None
    groups = length_groups(lengths, max_groups) if lengths is not None else None
    if groups is None or len(groups) == 1:
        return _one_pass(model, batch, chunk_tokens)
    width = mask.size(1)
    multiple = 8 if mask.device.type == "cuda" else 1
    results, order = [], []
    for rows in groups:
        length = min(width, -(-max(lengths[i] for i in rows) // multiple) * multiple)
        index = torch.as_tensor(rows, device=mask.device)
        part = {k: batch[k].index_select(0, index)[:, :length]
                for k in ("input_ids", "attention_mask", "labels")}
        results.append(_one_pass(model, part, chunk_tokens))
        order += rows
    inverse = torch.argsort(torch.as_tensor(order, device=mask.device))  # group order -> batch order
    return CompletionScores(
        logp_sum=torch.cat([r.logp_sum for r in results])[inverse],
        token_count=torch.cat([r.token_count for r in results])[inverse],
        logit_sum=torch.cat([r.logit_sum for r in results])[inverse],
        vocab_size=results[0].vocab_size,
    )
