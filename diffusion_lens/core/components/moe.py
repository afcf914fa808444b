"""Mixture-of-experts MLP: softmax or sigmoid router, optional expert bias and group-limited top-k,
optional shared expert.

Routing is described by config fields only (`DiffusionConfig.router_*`), two ways:

    router_score="softmax" (OLMoE, LLaDA-MoE)
        logits   = router(x)                          model dtype (fp32 with cfg.router_fp32)
        select   = softmax(logits) in fp32 (+ expert_bias when cfg.router_expert_bias, added AFTER the
                   softmax: it moves both the choice and the weights)
        top-k    over select; weights = select at the chosen experts
    router_score="sigmoid" (DeepSeek-V3, LLaDA2)
        logits   = router(x)                          fp32 with cfg.router_fp32
        scores   = sigmoid(logits) in fp32
        select   = scores (+ expert_bias): the bias only CHOOSES
        top-k    over select; weights = the unbiased scores at the chosen experts
    then, for both:
        groups   with cfg.router_n_groups: experts in contiguous groups, a group scored by the sum of
                 its two largest `select` entries, only the cfg.router_topk_groups best groups stay
                 eligible (the others' `select` is -inf) before the top-k
        weights  / (sum + 1e-20) when cfg.router_renormalize and n_experts_per_token > 1;
                 times cfg.routed_scaling_factor
        output   = sum_k weight_k * expert_k(x)  (in fp32 then cast with cfg.router_fp32, else in the
                   model dtype)  + shared_expert(x) when cfg.d_shared_expert_mlp (ungated)

Hook points (module `blocks.{l}.mlp`):

    hook_router_logits        [batch pos n_experts]   router output: model dtype, fp32 with cfg.router_fp32
    hook_router_probs         [batch pos n_experts]   fp32 selection scores, the tensor the top-k reads:
                                                      softmax (+ expert bias) for a softmax router;
                                                      sigmoid + expert bias for a sigmoid router, -inf
                                                      outside the kept groups when groups are on. Editing
                                                      it changes the choice (and, for softmax, the weights)
    hook_expert_weights       [batch pos n_experts]   dense routing weights (after renormalising and
                                                      scaling), model dtype (fp32 with cfg.router_fp32):
                                                      the weights at the chosen experts, 0 elsewhere. Tokens
                                                      are dispatched from this tensor *after* the hook,
                                                      so zeroing entry e drops expert e for that token and
                                                      writing a non-zero weight routes the token there.
    experts.{e}.hook_pre        [n_routed d_expert_mlp] gate pre-activation, routed tokens only
    experts.{e}.hook_pre_linear [n_routed d_expert_mlp] up branch
    experts.{e}.hook_post       [n_routed d_expert_mlp] silu(gate) * up
    experts.{e}.hook_out        [n_routed d_model]      expert output before its routing weight
    hook_routed_out           [batch pos d_model]     sum of weighted expert outputs
    shared_expert.hook_pre / hook_pre_linear / hook_post   [batch pos d_shared_expert_mlp]
    hook_shared_out           [batch pos d_model]     shared expert output (when there is one)

`n_routed` is the number of tokens whose weight for expert e is non-zero, in row-major (batch,
pos) order: the rows of `experts.{e}.hook_*` are the tokens
`(hook_expert_weights[..., e] != 0).nonzero()`, in that order. Every expert's hooks fire on every
forward, with zero rows when no token chose it, so caches always hold the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.components.errors import KeepPropertyErrors
from diffusion_lens.core.components.mlp import GatedMLP
from diffusion_lens.core.config import DiffusionConfig


class Expert(GatedMLP):
    """One routed SwiGLU expert. It sees only its routed tokens, so its hooks are
    [n_routed d_expert_mlp] (and `hook_out` [n_routed d_model]) rather than [batch pos ...]."""

    def __init__(self, d_model: int, d_mlp: int, bias: bool = False, act: str = "silu"):
        super().__init__(d_model, d_mlp, bias=bias, act=act)
        self.hook_out = HookPoint()  # [n_routed d_model]

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        return self.hook_out(super().forward(x))


class MixtureOfExperts(KeepPropertyErrors, nn.Module):
    """Sparse MoE MLP with per-expert hook points; see the module docstring for routing and shapes.

    Weights (TransformerLens-style names under `blocks.{l}.mlp`): `router.weight` [n_experts
    d_model], `expert_bias` [n_experts] (buffer, when enabled), `experts.{e}.{gate,up,down}_proj`,
    `shared_expert.{gate,up,down}_proj`. Steering code edits `experts[e].down_proj` and
    `shared_expert.down_proj` like a dense MLP's `down_proj`.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "mlp.experts.3." in n)
        >>> cache["blocks.0.mlp.experts.3.hook_post"].shape  # [n_routed d_expert_mlp]
    """

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = cfg.n_experts
        self.top_k = cfg.n_experts_per_token
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        if cfg.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        else:
            self.expert_bias = None
        self.experts = nn.ModuleList(
            Expert(cfg.d_model, cfg.d_expert_mlp, bias=cfg.mlp_bias, act=cfg.mlp_act) for _ in range(cfg.n_experts)
        )
        self.shared_expert = (
            GatedMLP(cfg.d_model, cfg.d_shared_expert_mlp, bias=cfg.mlp_bias, act=cfg.mlp_act) if cfg.d_shared_expert_mlp else None
        )
        self.hook_router_logits = HookPoint()  # [batch pos n_experts]
        self.hook_router_probs = HookPoint()  # [batch pos n_experts] fp32
        self.hook_expert_weights = HookPoint()  # [batch pos n_experts]
        self.hook_routed_out = HookPoint()  # [batch pos d_model]
        if self.shared_expert is not None:
            self.hook_shared_out = HookPoint()  # [batch pos d_model]

    def routing_weights(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_experts"]:
        """Dense top-k routing weights (0 for experts a token does not use), after the router hooks.

        Why: one [batch pos n_experts] tensor says which experts each token uses and with what
        weight, so it can be cached, analysed (e.g. expert usage per position) or edited in a hook.

        Example:
            >>> w = model.blocks[0].mlp.routing_weights(model.blocks[0].ln2(resid))  # [batch pos n_experts]
            >>> (w != 0).sum(-1)  # n_experts_per_token everywhere
        """
        cfg = self.cfg
        if cfg.router_fp32:
            logits = self.hook_router_logits(F.linear(x.float(), self.router.weight.float()))
        else:
            logits = self.hook_router_logits(self.router(x))
        if cfg.router_score == "sigmoid":
            scores = torch.sigmoid(logits.float())
            select = scores if self.expert_bias is None else scores + self.expert_bias.float()
        else:
            select = torch.softmax(logits.float(), dim=-1)
            if self.expert_bias is not None:
                select = select + self.expert_bias.float()
        if cfg.router_n_groups is not None:
            select = self._keep_best_groups(select)
        select = self.hook_router_probs(select)
        top_experts = select.topk(self.top_k, dim=-1).indices
        # softmax: the weights are the (hooked) selection scores; sigmoid: the unbiased scores
        top_weights = (scores if cfg.router_score == "sigmoid" else select).gather(-1, top_experts)
        if cfg.router_renormalize and self.top_k > 1:
            top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)
        top_weights = top_weights * cfg.routed_scaling_factor
        dense = torch.zeros_like(select).scatter_(-1, top_experts, top_weights)
        return self.hook_expert_weights(dense if cfg.router_fp32 else dense.to(x.dtype))

    def _keep_best_groups(self, select: Float[Tensor, "batch pos n_experts"]) -> Float[Tensor, "batch pos n_experts"]:
        """`select` with -inf outside the `router_topk_groups` groups whose two best scores sum highest."""
        groups = select.unflatten(-1, (self.cfg.router_n_groups, -1))  # [batch pos group expert_in_group]
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(self.cfg.router_topk_groups, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, kept, True)
        return groups.masked_fill(~keep[..., None], float("-inf")).flatten(-2)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        batch, n_pos, d_model = x.shape
        weights = self.routing_weights(x).reshape(batch * n_pos, self.n_experts)
        flat = x.reshape(batch * n_pos, d_model)
        # Sort-by-expert dispatch: nonzero() on the [expert token] view lists (expert, token) pairs
        # grouped by expert and in token order, so each expert reads one contiguous slice.
        expert_ids, token_ids = weights.T.nonzero(as_tuple=True)
        counts = torch.bincount(expert_ids, minlength=self.n_experts).tolist()
        routed_in = flat.index_select(0, token_ids)
        routed_out = torch.empty_like(routed_in)
        start = 0
        for expert, count in zip(self.experts, counts):
            routed_out[start : start + count] = expert(routed_in[start : start + count])
            start += count
        # in the weights' dtype (fp32 with cfg.router_fp32), then cast back
        routed_out = routed_out * weights[token_ids, expert_ids][:, None]
        combined = flat.new_zeros(flat.shape, dtype=routed_out.dtype).index_add_(0, token_ids, routed_out)
        out = self.hook_routed_out(combined.view(batch, n_pos, d_model).to(x.dtype))
        if self.shared_expert is not None:
            out = out + self.hook_shared_out(self.shared_expert(x))
        return out

    # A dense MLP's TransformerLens views have no meaning here: each expert sees only its routed
    # tokens, so say where the per-expert views are instead of a bare "no attribute".
    def _no_dense_view(self, name: str):
        raise AttributeError(
            f"This MLP is a mixture of {self.n_experts} experts (top-{self.top_k} per token), so there is "
            f"no single {name} or [batch pos d_mlp] neuron view; use .experts[e].{name} with the rows of "
            "the cached experts.{e}.hook_post (the tokens routed to expert e), or hook_routed_out."
        )

    W_in = property(lambda self: self._no_dense_view("W_in"))
    W_gate = property(lambda self: self._no_dense_view("W_gate"))
    W_out = property(lambda self: self._no_dense_view("W_out"))
    b_in = property(lambda self: self._no_dense_view("b_in"))

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        """Constant term of the MLP output: the shared expert's output bias, else zeros. Routed expert
        output biases are weighted per token, so they are no constant: an error then."""
        if any(expert.down_proj.bias is not None for expert in self.experts):
            self._no_dense_view("b_out")
        if self.shared_expert is not None:
            return self.shared_expert.b_out
        weight = self.router.weight
        return torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
