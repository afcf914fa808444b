"""Mixture-of-experts MLP (softmax router, optional expert bias, top-k, optional shared expert).

Routing, as LLaDA-MoE / OLMoE compute it, is described by config fields only:

    probs    = softmax(router(x)) in fp32        (+ expert_bias when cfg.router_expert_bias; added
                                                  AFTER the softmax, used to select and to weight)
    top-k    over probs, no renormalisation      (cfg.n_experts_per_token)
    output   = sum_k weight_k * expert_k(x)      (+ shared_expert(x) when cfg.d_shared_expert_mlp)

Hook points (module `blocks.{l}.mlp`):

    hook_router_logits        [batch pos n_experts]   router output, model dtype
    hook_router_probs         [batch pos n_experts]   fp32 softmax (+ expert bias): the selection score
    hook_expert_weights       [batch pos n_experts]   dense routing weights, model dtype: the top-k
                                                      scores at the chosen experts, 0 elsewhere. Tokens
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
        logits = self.hook_router_logits(self.router(x))
        probs = torch.softmax(logits.float(), dim=-1)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias.float()
        probs = self.hook_router_probs(probs)
        top_weights, top_experts = probs.topk(self.top_k, dim=-1)
        dense = torch.zeros_like(probs).scatter_(-1, top_experts, top_weights).to(x.dtype)
        return self.hook_expert_weights(dense)

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
        routed_out = routed_out * weights[token_ids, expert_ids][:, None]
        combined = torch.zeros_like(flat).index_add_(0, token_ids, routed_out)
        out = self.hook_routed_out(combined.view(batch, n_pos, d_model))
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
