"""The Monte-Carlo masked log-likelihood of a continuation, as the LLaDA paper evaluates it.

Why: a masked diffusion LM has no left-to-right factorisation, so log p(continuation | context)
is not one forward. LLaDA (Nie et al. 2025, eq. 6 and `get_log_likelihood.py`) scores the
continuation with its ELBO instead: draw a number of masked tokens k uniformly in 1..L (L = the
continuation's length), mask k of the L continuation tokens uniformly at random, and sum the
log-probabilities of the masked tokens, weighted by L / k:

    log p(c | x) >= E_k E_mask [ (L / k) * sum_{i masked} log p_theta(c_i | x, c_unmasked) ]

The estimate is a random variable, not the exact log-likelihood: it is an unbiased estimate of
the lower bound, and its standard error falls as 1 / sqrt(mc_samples) (`MCEstimate.stderr`;
tests/test_lm_eval.py checks both the rate and the one case where it is exact: a one-token
continuation always masks that token, so every sample is log p(c_1 | x)). The k of the samples
in one forward batch are stratified (one uniform offset, then evenly spaced in 1..L) as LLaDA's
script does, which lowers the variance without bias. Dream's evaluation uses the same estimator
with its logit shift, which `model.token_logits` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class MCEstimate:
    """One Monte-Carlo estimate: the mean over samples and its standard error (std / sqrt(n)).

    Example:
        >>> est = mc_loglikelihood(model, ctx, cont, mc_samples=64, batch_size=16, seed=0)
        >>> est.value, est.stderr, est.n_samples
    """

    value: float
    stderr: float
    n_samples: int


def mc_loglikelihood(
    model,
    context: Int[Tensor, " c"],
    continuation: Int[Tensor, " l"],
    *,
    mc_samples: int,
    batch_size: int,
    seed: int,
    hooks=(),
) -> MCEstimate:
    """LLaDA's masked ELBO of `continuation` after `context` (token ids), with `mc_samples` samples.

    Each forward holds up to `batch_size` masked copies of [context, continuation]; `hooks`
    (steering) are active in every forward; `seed` fixes the masks (a torch.Generator, the
    global RNG is untouched).

    Example:
        >>> ctx, cont = model.to_tokens("The capital of France is")[0], model.to_tokens(" Paris")[0]
        >>> mc_loglikelihood(model, ctx, cont, mc_samples=128, batch_size=32, seed=0).value
    """
    for name, value in (("mc_samples", mc_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if continuation.ndim != 1 or context.ndim != 1:
        raise ValueError(f"context and continuation must be 1-D token ids; got shapes {tuple(context.shape)} "
                         f"and {tuple(continuation.shape)}.")
    n_cont = continuation.shape[0]
    if n_cont == 0:
        raise ValueError("The continuation has no tokens; there is nothing to score.")
    device = model.embed.weight.device
    sequence = torch.cat([context, continuation]).to(device)
    start = context.shape[0]
    targets = sequence[start:]
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        for done in range(0, mc_samples, batch_size):
            rows = min(batch_size, mc_samples - done)
            offset = torch.rand((), generator=generator, dtype=torch.float64)
            fraction = (offset + torch.arange(rows, dtype=torch.float64) / rows) % 1.0
            n_masked = (fraction * n_cont).floor().long().clamp(max=n_cont - 1) + 1          # [rows], in 1..L
            order = torch.rand((rows, n_cont), generator=generator).argsort(dim=1)
            masked = (order < n_masked[:, None]).to(device)                                    # k random positions
            canvas = sequence.repeat(rows, 1)
            canvas[:, start:] = torch.where(masked, model.cfg.mask_token_id, targets)
            logits = model.token_logits(model(canvas))[:, start:].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.expand(rows, -1)[..., None])[..., 0]
            weight = n_cont / n_masked.to(device=device, dtype=torch.float64)
            samples.append((logp.double() * masked).sum(1) * weight)
    values = torch.cat(samples)
    stderr = float(values.std(unbiased=True)) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return MCEstimate(float(values.mean()), stderr, len(values))
