"""A learned low-rank refusal subspace: a few gradient steps through the frozen model on the
abliteration objective, instead of one difference-of-means direction.

Why: on a bidirectional dense model one fixed direction can barely move refusals (finding 4 of the
"Refusal Is a Direction" post), while a k-dim subspace optimised on the objective itself did.

The objective, on the step-0 canvas every sampler starts from (prompt + `gen_length` mask tokens,
as `CanvasProbe` builds it), with span(Q) projected out of the residual stream:

    loss(Q) = mean_harmful log_odds(refusal tokens at the first response position)
              + kl_weight * mean_(harmless prompt, response position) KL(unablated || ablated)

The ablation is x <- x - (x Q^T) Q at every block input (`hook_resid_pre`), between attention and
MLP (`hook_resid_mid`, where the block has one), at the last block's output and, for an LM head
tied to the embedding, at its input (`hook_unembed_in`): exactly what an `AbliterationEdit` with
weight 1 on every writer (embedding included) does to the stream, since `writer_basis` makes every
writer's output, after its norms, orthogonal to span(Q). Q is the orthonormalised rows (QR) of a
free parameter A [rank d_model], trained with Adam; the model's weights get no gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import tqdm.auto
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.denoising import CanvasProbe, generate
from diffusion_lens.evals.scores import log_odds, resolve_refusal_tokens
from diffusion_lens.prompts.batching import PromptsInput, batch_indices, left_pad, prepare_prompts
from diffusion_lens.steering._common import Hook, orthonormal_rows, unit


@dataclass
class LearnedSubspace:
    """The result of `learn_subspace`: the orthonormal `basis` [rank d_model] (float64, CPU) and the
    objective along the way. `losses`, `refusal` and `kl` have steps + 1 entries: entry s is measured
    at the basis before update s, the last one at the returned basis (`refusal`: mean first-position
    refusal log-odds over the harmful prompts; `kl`: mean masked-position KL on the harmless ones;
    `losses` = refusal + kl_weight * kl). `seconds`: the wall time of the learning.

    Example:
        >>> sub = learn_subspace(model, harmful, harmless, rank=2, init=r)
        >>> sub.losses[0], sub.losses[-1], sub.basis.shape        # falls; [2 d_model]
    """

    basis: Float[Tensor, "rank d_model"]
    losses: list[float]
    refusal: list[float]
    kl: list[float]
    rank: int
    steps: int
    lr: float
    kl_weight: float
    gen_length: int
    seed: int
    init_rows: int = 0
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """A JSON-ready record: the options and the objective at the start and the end.

        Example:
            >>> sub.summary()["loss"]        # [at the init, at the learned basis]
        """
        return {"rank": self.rank, "steps": self.steps, "lr": self.lr, "kl_weight": self.kl_weight,
                "gen_length": self.gen_length, "seed": self.seed, "init_rows": self.init_rows,
                "seconds": round(self.seconds, 2),
                "loss": [self.losses[0], self.losses[-1]], "refusal_log_odds": [self.refusal[0], self.refusal[-1]],
                "kl": [self.kl[0], self.kl[-1]]}


def subspace_ablation_hooks(model, basis: Float[Tensor, "rank d_model"]) -> list[Hook]:
    """Hooks projecting span(`basis`) (orthonormal rows; may require grad) out of the residual stream
    wherever a full-weight `AbliterationEdit` removes it (module docstring): every block input and
    middle, the last block output, a tied LM head's input.

    Example:
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=subspace_ablation_hooks(model, q))
    """
    names = []
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.{site}" for site in ("hook_resid_pre", "hook_resid_mid")
                  if f"blocks.{layer}.{site}" in model.hook_dict]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    if model.unembed.weight is model.embed.weight:  # a tied head reads the edited embedding rows
        names.append("hook_unembed_in")

    def project(x, hook):
        q = basis.to(x.device, x.dtype)
        return x - (x @ q.T) @ q

    return [(name, project) for name in names]


def learn_subspace(
    model,
    harmful: PromptsInput,
    harmless: PromptsInput,
    *,
    rank: int = 2,
    init: Optional[Tensor] = None,
    steps: int = 20,
    lr: float = 0.05,
    kl_weight: float = 1.0,
    gen_length: int = 32,
    batch_size: int = 16,
    refusal_tokens: Optional[Sequence[int]] = None,
    seed: int = 0,
    progress: bool = False,
) -> LearnedSubspace:
    """Learn a `rank`-dim subspace whose ablation lowers the harmful prompts' refusal log-odds while
    keeping the harmless prompts' masked-position predictions (module docstring for the objective).

    `init`: a direction [d_model] or basis [k d_model] (k <= rank), e.g. the best difference-of-means
    direction, taken as the first rows of A; the other rows are seeded random (`seed`). Adam with
    `lr` (A's rows start at unit norm, so lr is roughly the turn per step in radians), full-batch
    gradient over all prompts each step (batches of `batch_size` accumulate). `refusal_tokens`
    default to `refusal_token_ids(model)`. Deterministic on CPU for a given seed. The unablated
    harmless log-probabilities are recorded once (n_harmless * gen_length * d_vocab float32).
    Cost per step: one forward and backward over every prompt, plus one forward at the end.
    Needs a mask token (the step-0 canvas is prompt + masks); a family whose canvas is noise
    (DiffusionGemma) is refused. The weights are untouched (no parameter gets a gradient; each
    parameter's requires_grad is restored) and the hooks are removed, also after an exception.

    Example:
        >>> r = mean_difference(model, harmful, harmless, layers=3).unit(3, "post_instruction[-1]")
        >>> sub = learn_subspace(model, harmful, harmless, rank=2, init=r, steps=20)
        >>> edit = AbliterationEdit(sub.basis.expand(model.cfg.n_layers, -1, -1), {"attention": kernel})
    """
    d_model = model.cfg.d_model
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d_model:
        raise ValueError(f"rank must be an int in [1, d_model={d_model}]; got {rank!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    if not lr > 0 or not kl_weight >= 0:
        raise ValueError(f"lr must be > 0 and kl_weight >= 0; got lr={lr!r}, kl_weight={kl_weight!r}.")
    if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length must be an int >= 1 (the first response position must exist); got {gen_length!r}.")
    if model.cfg.mask_token_id is None:
        raise ValueError("learn_subspace optimises on the step-0 canvas (prompt + mask tokens), and this model has no "
                         "mask token: its canvas is noise drawn by its sampler (e.g. DiffusionGemma), which a plain "
                         "differentiable forward cannot reproduce. Use a difference-of-means direction there.")
    started = time.perf_counter()
    ids = resolve_refusal_tokens(model, refusal_tokens)
    bad = _batches(model, harmful, "harmful", batch_size)
    good = _batches(model, harmless, "harmless", batch_size)
    a = _initial_rows(init, rank, d_model, seed).to(model.W_E.device)
    n_bad, n_good = sum(len(c[0]) for c in bad), sum(len(c[0]) for c in good)

    reference = [torch.log_softmax(_response_logits(model, tokens, mask, gen_length).double(), -1).float()
                 for tokens, mask in good]  # the unablated predictions, once

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    losses, refusals, kls = [], [], []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        a.requires_grad_(True)
        optimizer = torch.optim.Adam([a], lr=lr)
        for step in tqdm.auto.tqdm(range(steps + 1), desc="learning subspace", disable=not progress):
            learning = step < steps
            optimizer.zero_grad(set_to_none=True)
            refusal = kl = 0.0
            with torch.set_grad_enabled(learning):
                for tokens, mask in bad:
                    hooks = subspace_ablation_hooks(model, _orthonormal(a))
                    first = _response_logits(model, tokens, mask, gen_length, hooks, grad=learning)[:, 0]
                    term = log_odds(first, ids).sum() / n_bad
                    if learning:
                        term.backward()
                    refusal += float(term.detach())
                for (tokens, mask), ref in zip(good, reference):
                    hooks = subspace_ablation_hooks(model, _orthonormal(a))
                    logp = torch.log_softmax(_response_logits(model, tokens, mask, gen_length, hooks, grad=learning).double(), -1)
                    term = (ref.double().exp() * (ref.double() - logp)).sum() / (n_good * gen_length)
                    if learning and kl_weight:
                        (kl_weight * term).backward()
                    kl += float(term.detach())
            refusals.append(refusal)
            kls.append(kl)
            losses.append(refusal + kl_weight * kl)
            if learning:
                optimizer.step()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return LearnedSubspace(basis=_orthonormal(a.detach()).double().cpu(), losses=losses, refusal=refusals, kl=kls,
                           rank=rank, steps=steps, lr=float(lr), kl_weight=float(kl_weight), gen_length=gen_length,
                           seed=seed, init_rows=0 if init is None else (1 if init.ndim == 1 else init.shape[0]),
                           seconds=time.perf_counter() - started,
                           options={"batch_size": batch_size, "refusal_tokens": ids.tolist()})


def _initial_rows(init: Optional[Tensor], rank: int, d_model: int, seed: int) -> Tensor:
    """A [rank d_model] float64: the init's orthonormal rows, then seeded random unit rows."""
    rows = torch.zeros(0, d_model, dtype=torch.float64)
    if init is not None:
        if not isinstance(init, Tensor) or init.ndim not in (1, 2) or init.shape[-1] != d_model:
            raise ValueError(f"init must be a direction [d_model={d_model}] or a basis [k {d_model}]; got "
                             f"{tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__}.")
        rows = unit(init, name="init")[None] if init.ndim == 1 else orthonormal_rows(init, name="init")
        if rows.shape[0] > rank:
            raise ValueError(f"init has {rows.shape[0]} rows but rank={rank}; pass at most rank rows or raise rank.")
    extra = torch.randn(rank - rows.shape[0], d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    extra = extra / extra.norm(dim=1, keepdim=True)
    return torch.cat([rows.cpu(), extra])


def _orthonormal(a: Tensor) -> Tensor:
    """Orthonormal rows spanning A's rows (QR, differentiable)."""
    q, _ = torch.linalg.qr(a.T)
    return q.T


def _batches(model, prompts, argument: str, batch_size: int) -> list[tuple[Tensor, Optional[Tensor]]]:
    """The prompts left-padded into batches: (tokens, attention mask) each."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    prepared = prepare_prompts(model, prompts, argument=argument)
    return [left_pad(model, [prepared.tokens[i] for i in indices])[:2]
            for indices in batch_indices(model, prepared, batch_size)]


def _response_logits(model, tokens: Tensor, mask: Optional[Tensor], gen_length: int, hooks: Sequence = (),
                     grad: bool = False) -> Float[Tensor, "batch gen vocab"]:
    """The predictions for the response positions of the step-0 canvas (`CanvasProbe`: prompt +
    gen_length masks; logit shift applied), with gradients to the hooks' tensors when `grad`."""
    run = generate(model, tokens, attention_mask=mask, sampler=CanvasProbe(gen_length=gen_length), hooks=list(hooks),
                   capture_logits=[0], return_trajectory=False, progress=False, grad=grad)
    return model.token_logits(run.logits[0])[:, run.response_start:]
