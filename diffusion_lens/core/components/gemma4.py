"""Gemma-4's block layout (`DiffusionConfig.block_layout="gemma4"`, DiffusionGemma): sandwich norms, a
dense MLP and a mixture of experts in parallel in every layer, the residual times a per-layer scalar.

    resid_mid  = resid_pre + ln_attn_out(attn(ln1(resid_pre)))
    dense      = mlp.ln_dense_out(mlp.dense(mlp.ln_dense_in(resid_mid)))
    routing    = top-k of softmax(router.proj(rms(resid_mid) * router.scale * d_model^-1/2)), renormalised
                 over the k chosen, times router.per_expert_scale[e]
    moe        = mlp.ln_moe_out(sum_k routing_k * expert_k(mlp.ln_moe_in(resid_mid)))
    resid_post = (resid_mid + mlp.ln_out(dense + moe)) * <pass>_layer_scalar  (the forward's pass_name)

Norms multiply their weight as stored (no `1 + w`), in fp32 when `cfg.norm_weight_in_fp32`. Experts
are fused tensors as in the checkpoint: `experts.gate_up_proj` [n_experts 2*d_expert_mlp d_model]
(gate rows first) and `experts.down_proj` [n_experts d_model d_expert_mlp].

Hook points (module `blocks.{l}`; existing names keep their meaning: what is added to the residual):

    hook_resid_pre, hook_resid_mid, hook_resid_post   [batch pos d_model]
    ln_attn_out.hook_in       [batch pos d_model]   o_proj's output, before ln_attn_out
    hook_attn_out             [batch pos d_model]   attention output after ln_attn_out (added to the residual)
    hook_mlp_out              [batch pos d_model]   mlp.ln_out(dense + moe) (added to the residual)
    mlp.ln_dense_out.hook_in  [batch pos d_model]   the dense MLP's down_proj output, before its post-norm
    mlp.hook_dense_out        [batch pos d_model]   dense branch after its post-norm
    mlp.hook_moe_out          [batch pos d_model]   expert branch after its post-norm
    mlp.hook_router_logits    [batch pos n_experts] router scores before the softmax
    mlp.hook_router_probs     [batch pos n_experts] fp32 softmax (HF's `router_logits`)
    mlp.hook_expert_weights   [batch pos n_experts] final routing weights at the chosen experts, 0 elsewhere;
                                                    tokens are dispatched from this tensor after the hook
    mlp.hook_routed_out       [batch pos d_model]   weighted expert sum, before ln_moe_out
    mlp.experts.{e}.hook_pre / hook_pre_linear / hook_post   [n_routed d_expert_mlp] (rows as in moe.py)
    mlp.experts.{e}.hook_out  [n_routed d_model]    expert output before its routing weight

Residual writers (`Gemma4Block.residual_writers`): every writer reaches the residual stream through
weighted norms, so runtime ablation that equals a weight edit acts on the pre-norm outputs
(`ln_attn_out.hook_in`, `mlp.ln_dense_out.hook_in`, `mlp.hook_routed_out`), not on the post-norm
`hook_attn_out` / `hook_mlp_out` (docs/families/diffusion_gemma.md, "Steering").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.components.attention import Attention, AttentionMask
from diffusion_lens.core.components.mlp import ACTIVATIONS, GatedMLP
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.rotary import Rotary
from diffusion_lens.core.components.writers import ResidualWriter
from diffusion_lens.core.config import DiffusionConfig


class ExpertHooks(nn.Module):
    """The hook points of one fused expert (it has no weights of its own: see `FusedExperts`)."""

    def __init__(self):
        super().__init__()
        self.hook_pre = HookPoint()  # [n_routed d_expert_mlp] gate pre-activation
        self.hook_pre_linear = HookPoint()  # [n_routed d_expert_mlp] up branch
        self.hook_post = HookPoint()  # [n_routed d_expert_mlp] act(gate) * up
        self.hook_out = HookPoint()  # [n_routed d_model] expert output before its routing weight


class FusedExperts(nn.ModuleList):
    """Experts stored as two fused tensors (the checkpoint's layout); `experts[e]` holds expert e's hooks.

    Why two paths: a loop over experts gives each expert's hook points its rows, but costs a few dozen
    small ops per expert (10% of the MoE block at the bench shape, against transformers' grouped
    matmul). While no hook function is attached to any expert's hook points (and no gradient is
    needed) the same products run as two grouped matmuls, bit for bit the loop's (tested); attaching a
    hook, e.g. `run_with_cache` of an expert's hook points, takes the loop (`_can_group`).

    Example:
        >>> experts = model.blocks[0].mlp.experts
        >>> experts.gate_up_proj.shape, experts.down_proj.shape   # [E 2I D], [E D I]
    """

    def __init__(self, cfg: DiffusionConfig):
        super().__init__(ExpertHooks() for _ in range(cfg.n_experts))
        self.d_expert = cfg.d_expert_mlp
        self.act = ACTIVATIONS[cfg.mlp_act]
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_expert_mlp, cfg.d_model))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_expert_mlp))
        nn.init.normal_(self.gate_up_proj, std=cfg.d_model**-0.5)
        nn.init.normal_(self.down_proj, std=cfg.d_expert_mlp**-0.5)

    def forward(
        self, x: Float[Tensor, "n_tokens d_model"], weights: Float[Tensor, "n_tokens n_experts"]
    ) -> Float[Tensor, "n_tokens d_model"]:
        # Sort-by-expert dispatch (as moe.py): (expert, token) pairs grouped by expert, in token order.
        expert_ids, token_ids = weights.T.nonzero(as_tuple=True)
        counts = torch.bincount(expert_ids, minlength=len(self))
        routed_in = x.index_select(0, token_ids)
        if not self._can_group(routed_in):
            routed_out = self._per_expert(routed_in, counts.tolist())
        else:
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(routed_in, self.gate_up_proj.transpose(1, 2), offs=offsets).split(self.d_expert, -1)
            routed_out = F.grouped_mm(self.act(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        routed_out = routed_out * weights[token_ids, expert_ids][:, None]
        return torch.zeros_like(x).index_add_(0, token_ids, routed_out)

    def _can_group(self, routed_in: Float[Tensor, "n_routed d_model"]) -> bool:
        """Whether the grouped matmuls may replace the loop: no hook function on any expert's hook point
        (forward or backward), no gradient (their backward is not used), on the CPU (where they are
        checked bit-exact; elsewhere untested), in a dtype they take, with the 16-byte-aligned rows
        they require."""
        if torch.is_grad_enabled() and (routed_in.requires_grad or self.down_proj.requires_grad):
            return False
        if routed_in.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        size = routed_in.element_size()
        if routed_in.device.type != "cpu" or (routed_in.shape[1] * size) % 16 or (self.d_expert * size) % 16:
            return False
        return not any(point.fwd_hooks or point.bwd_hooks for hooks in self
                       for point in (hooks.hook_pre, hooks.hook_pre_linear, hooks.hook_post, hooks.hook_out))

    def _per_expert(self, routed_in: Float[Tensor, "n_routed d_model"], counts: list[int]) -> Float[Tensor, "n_routed d_model"]:
        """Each expert on its rows of `routed_in` (grouped by expert, `counts` rows each), its hook points firing."""
        routed_out = torch.empty_like(routed_in)
        start = 0
        for expert, (hooks, count) in enumerate(zip(self, counts)):
            gate, up = F.linear(routed_in[start : start + count], self.gate_up_proj[expert]).split(self.d_expert, -1)
            hidden = hooks.hook_post(self.act(hooks.hook_pre(gate)) * hooks.hook_pre_linear(up))
            routed_out[start : start + count] = hooks.hook_out(F.linear(hidden, self.down_proj[expert]))
            start += count
        return routed_out


class Gemma4Router(nn.Module):
    """Weights of the Gemma-4 router: `scale` [d_model], `proj` [n_experts d_model], `per_expert_scale`
    [n_experts], and a weightless norm; `Gemma4FeedForward.routing_weights` runs it with its hooks."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32, weight=False)
        self.scale = nn.Parameter(torch.ones(cfg.d_model))
        self.proj = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.n_experts))
        self.root_size = cfg.d_model**-0.5


class Gemma4FeedForward(nn.Module):
    """The dense MLP and the mixture of experts in parallel, each with its pre/post norms, then a
    norm of their sum (module docstring). Reads the residual `resid_mid` directly.

    Example:
        >>> out = model.blocks[0].mlp(resid_mid)   # [batch pos d_model], = blocks.0.hook_mlp_out
    """

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        def norm(input_hook: bool = False) -> RMSNorm:
            return RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32, input_hook=input_hook)

        self.top_k = cfg.n_experts_per_token
        self.ln_dense_in, self.ln_dense_out = norm(), norm(input_hook=True)
        self.dense = GatedMLP(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias, act=cfg.mlp_act)
        self.router = Gemma4Router(cfg)
        self.ln_moe_in, self.ln_moe_out = norm(), norm()
        self.experts = FusedExperts(cfg)
        self.ln_out = norm()
        self.hook_dense_out = HookPoint()  # [batch pos d_model]
        self.hook_router_logits = HookPoint()  # [batch pos n_experts]
        self.hook_router_probs = HookPoint()  # [batch pos n_experts] fp32
        self.hook_expert_weights = HookPoint()  # [batch pos n_experts]
        self.hook_routed_out = HookPoint()  # [batch pos d_model]
        self.hook_moe_out = HookPoint()  # [batch pos d_model]

    def routing_weights(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_experts"]:
        """Dense routing weights (0 for experts a token does not use), after the router hooks.

        Example:
            >>> w = model.blocks[0].mlp.routing_weights(resid_mid)   # [batch pos n_experts]
        """
        router = self.router
        scores = self.hook_router_logits(router.proj(router.norm(x) * router.scale * router.root_size))
        probs = self.hook_router_probs(torch.softmax(scores, dim=-1, dtype=torch.float32))
        top_weights, top_experts = probs.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True) * router.per_expert_scale[top_experts]
        dense = probs.new_zeros(probs.shape, dtype=top_weights.dtype).scatter_(-1, top_experts, top_weights).to(x.dtype)
        return self.hook_expert_weights(dense)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        dense = self.hook_dense_out(self.ln_dense_out(self.dense(self.ln_dense_in(x))))
        weights = self.routing_weights(x)
        batch, n_pos, d_model = x.shape
        flat = self.ln_moe_in(x).reshape(batch * n_pos, d_model)
        routed = self.experts(flat, weights.reshape(batch * n_pos, -1)).view(batch, n_pos, d_model)
        moe = self.hook_moe_out(self.ln_moe_out(self.hook_routed_out(routed)))
        return self.ln_out(dense + moe)


class Gemma4Block(nn.Module):
    """Layer `layer` in the Gemma-4 layout (module docstring); hook points `blocks.{layer}.hook_*`.

    One persistent scalar buffer per `cfg.layer_scalar_passes` entry (`{pass}_layer_scalar`, [1]);
    the forward applies its `pass_name`'s (the model resolves None to `cfg.default_pass`).

    Example:
        >>> model.blocks[0].encoder_layer_scalar   # tensor([...]) on DiffusionGemma
    """

    def __init__(self, cfg: DiffusionConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
        self.attn = Attention(cfg, rotary, layer)
        self.ln_attn_out = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32, input_hook=True)
        self.mlp = Gemma4FeedForward(cfg)
        for name in cfg.layer_scalar_passes:
            self.register_buffer(f"{name}_layer_scalar", torch.ones(1))
        self.hook_resid_pre = HookPoint()  # [batch pos d_model]
        self.hook_attn_out = HookPoint()  # [batch pos d_model] after ln_attn_out
        self.hook_resid_mid = HookPoint()  # [batch pos d_model]
        self.hook_mlp_out = HookPoint()  # [batch pos d_model]
        self.hook_resid_post = HookPoint()  # [batch pos d_model] after the layer scalar

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        rope: tuple[Tensor, Tensor],
        kv: Optional[tuple[Tensor, Tensor]] = None,
        window_start: int = 0,
        pass_name: Optional[str] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """resid_post = (resid_mid + mlp(resid_mid)) * scalar, resid_mid = resid_pre + ln_attn_out(attn(ln1(resid_pre))),
        with `pass_name`'s scalar (None: no scalar, for a config without passes).

        Example:
            >>> resid = model.blocks[0](model.hook_embed(model.embed(tokens)), None, rope, pass_name="encoder")
        """
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.ln_attn_out(self.attn(self.ln1(resid_pre), mask, rope, kv, window_start)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        resid_post = resid_mid + self.hook_mlp_out(self.mlp(resid_mid))
        if pass_name is not None:
            resid_post = resid_post * getattr(self, f"{pass_name}_layer_scalar")
        return self.hook_resid_post(resid_post)

    def residual_writers(self) -> list[ResidualWriter]:
        """`o_proj` through `ln_attn_out`; the dense `down_proj` through `ln_dense_out` then `ln_out`;
        every slice of the fused `experts.down_proj` through `ln_moe_out` then `ln_out`. Each at its
        pre-norm hook (module docstring). The layer scalar scales the residual: no direction changes.

        Example:
            >>> [w.hooks[0] for w in model.blocks[0].residual_writers()]
            ['ln_attn_out.hook_in', 'mlp.ln_dense_out.hook_in', 'mlp.hook_routed_out']
        """
        mlp = self.mlp
        return [
            ResidualWriter(("ln_attn_out.hook_in",), (("attn.o_proj", self.attn.o_proj),), (self.ln_attn_out,)),
            ResidualWriter(("mlp.ln_dense_out.hook_in",), (("mlp.dense.down_proj", mlp.dense.down_proj),),
                           (mlp.ln_dense_out, mlp.ln_out)),
            ResidualWriter(("mlp.hook_routed_out",), (("mlp.experts.down_proj", mlp.experts.down_proj),),
                           (mlp.ln_moe_out, mlp.ln_out)),
        ]
