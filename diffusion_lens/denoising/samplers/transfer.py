"""Commit rules: which candidate positions a denoising step fills, as pure functions of confidences.

Each rule takes per-position confidences [batch pos] and the candidates (masked positions the
step may fill) and returns the positions to commit, per row. Three rules cover the LLaDA and
Dream samplers and Fast-dLLM's parallel decoding (`docs/concepts.md`, "Caching and what hooks see";
spec: Fast-dLLM, arXiv 2505.22618):

  * `quota_schedule` + `select_top_k`: the scheduled number per step (the reference samplers);
  * `select_threshold`: every candidate at or above a confidence threshold, plus each row's best;
  * `select_factor`: the top ranks while rank j's confidence stays >= 1 - factor / (j + 1).

Example:
    >>> conf = torch.tensor([[0.9, 0.2, 0.5]]); cand = torch.tensor([[True, True, True]])
    >>> select_threshold(conf, cand, 0.6), select_factor(conf, cand, 1.0)
    (tensor([[ True, False, False]]), tensor([[ True, False, False]]))
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def quota_schedule(n_masked: Int[Tensor, " batch"], steps: int) -> Int[Tensor, "batch steps"]:
    """Tokens to commit per row at each of a block's `steps` steps: the masks spread evenly, extras first.

    Example:
        >>> quota_schedule(torch.tensor([8, 5]), 4).tolist()
        [[2, 2, 2, 2], [2, 1, 1, 1]]
    """
    base, extra = n_masked[:, None] // steps, n_masked[:, None] % steps
    return base + (torch.arange(steps, device=n_masked.device) < extra).long()


def select_top_k(confidence: Float[Tensor, "batch pos"], ks: list[int]) -> Bool[Tensor, "batch pos"]:
    """The `ks[r]` most confident positions of each row r (one batched top-k when all k agree).

    Non-candidates must carry a confidence below every candidate's (e.g. -inf).

    Example:
        >>> select_top_k(torch.tensor([[0.1, 0.7, 0.3]]), [2]).tolist()
        [[False, True, True]]
    """
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    if len(set(ks)) == 1:
        if ks[0]:
            transfer.scatter_(1, confidence.topk(ks[0], dim=1).indices, True)
        return transfer
    for row, k in enumerate(ks):
        if k:
            transfer[row, confidence[row].topk(k).indices] = True
    return transfer


def select_threshold(
    confidence: Float[Tensor, "batch pos"], candidates: Bool[Tensor, "batch pos"], threshold: float
) -> Bool[Tensor, "batch pos"]:
    """Candidates with confidence >= `threshold`, plus each row's most confident candidate (first on
    ties), so every row with a candidate commits at least one token; rows without candidates commit none.

    Why: Fast-dLLM's parallel decoding: confident positions are filled together, and the forced
    best keeps the loop moving when nothing is confident.

    Example:
        >>> select_threshold(torch.tensor([[0.2, 0.95, 0.1]]), torch.ones(1, 3, dtype=torch.bool), 0.9).tolist()
        [[False, True, False]]
    """
    masked = confidence.masked_fill(~candidates, float("-inf"))
    selected = candidates & (confidence >= threshold)
    has = candidates.any(dim=1)
    best = masked.argmax(dim=1)
    selected[has, best[has]] = True
    return selected


def select_factor(
    confidence: Float[Tensor, "batch pos"], candidates: Bool[Tensor, "batch pos"], factor: float
) -> Bool[Tensor, "batch pos"]:
    """Fast-dLLM's factor rule, per row: sort the candidates' confidences c_1 >= c_2 >= ...; rank j
    passes when c_j >= 1 - factor / (j + 1) (rank 1 always passes); commit the ranks before the
    first failing one. Upstream's count quirk is part of the rule: when the first failure is the
    last rank, or nothing fails, all candidates are committed.

    Example:
        >>> conf = torch.tensor([[0.5, 0.4, 0.1, 0.05]])   # factor 1: thresholds 2/3, 3/4, ... from rank 2
        >>> select_factor(conf, torch.ones(1, 4, dtype=torch.bool), 1.0).tolist()
        [[True, False, False, False]]
    """
    selected = torch.zeros_like(candidates)
    for row in range(confidence.shape[0]):
        index = candidates[row].nonzero().flatten()
        n = index.numel()
        if n == 0:
            continue
        values, order = confidence[row, index].sort(descending=True)
        ranks = torch.arange(1, n + 1, device=values.device, dtype=values.dtype)
        fails = values < 1 - factor / (ranks + 1)
        fails[0] = False
        failing = fails.nonzero().flatten()
        first = int(failing[0]) if failing.numel() else n - 1  # 0-based index of the first failing rank
        count = first + 1 if first in (0, n - 1) else first
        selected[row, index[order[:count]]] = True
    return selected


__all__ = ["quota_schedule", "select_factor", "select_threshold", "select_top_k"]
