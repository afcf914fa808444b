"""Affine transport maps T(a) = omega * a + beta (Rodriguez et al. 2024, Lek et al.).

`fit_transport` estimates a map per hook site from source / target activations:

* ``"mean"``      Mean-ACT: omega = 1, beta = m_t - m_s.
* ``"gaussian"``  Gaussian OT per dimension: omega = s_t / s_s, beta = m_t - omega m_s; dimensions
  whose source std is <= `min_std` (1e-4) are left unchanged (omega 1, beta 0). Statistics in
  float64, population (biased) standard deviations.
* ``"linear"``    Linear-ACT: each dimension's source and target samples are sorted independently
  and a least-squares line is fitted through the sorted pairs (quantile-quantile regression).
  With unequal counts the larger sorted sample is linearly interpolated onto the smaller one's
  quantile grid.

Strength lambda interpolates with the identity: T_l(a) = (1 - l) a + l T(a), i.e.
omega_l = l omega + 1 - l and beta_l = l beta.

Support gate (optional): `support=(q_lo, q_hi)` records, per site and per dimension, the q_lo and
q_hi quantiles of the *source* samples; at run time a coordinate a_j is mapped only when
lo_j <= a_j <= hi_j and passes through unchanged otherwise (per position, per dimension).
`support="minmax"` is (0, 1), ml-act's default for Linear-ACT. A gated map is not affine and
cannot be folded into weights.

`AffineMap` is also the package's one intervention type: a site may carry a low-rank term,
T(a) = omega * a + U (V^T a) + beta with U, V [d k]. `AffineMap.from_ablation` (and `ablate`,
`orthogonalize_weights`) is omega = 1, U = -r, V = r; `from_addition` (and `add`) is beta only.
Hooks, folds and weight orthogonalisation all run `diffusion_lens.steering.edits.SiteEdit`.

`fold(model, map)` writes an ungated map into a linear layer, exactly (zero inference overhead).
With a low-rank term, A = diag(omega) + U V^T takes the place of diag(omega) in the rules below,
at rank-k cost (U (V^T W), never a [d d] matrix). Foldable sites, and the layer each folds into:

==============================  =========================  ==========================================
site                            linear layer               rule
==============================  =========================  ==========================================
``hook_embed``                  ``embed`` (rows)           E' = E omega + beta (untied embeddings only)
``blocks.l.hook_attn_out``      ``attn.o_proj`` (producer) W' = diag(omega) W, b' = omega b + beta
``blocks.l.hook_mlp_out``       ``mlp.down_proj``          producer; mixture of experts: omega into
                                                           every expert's and the shared expert's
                                                           down_proj, beta into the shared expert's
                                                           bias (without a shared expert only beta = 0
                                                           folds, because routed weights need not sum
                                                           to one)
``blocks.l.mlp.hook_pre``       ``mlp.gate_proj``          producer
``blocks.l.mlp.hook_pre_linear`` ``mlp.up_proj``           producer
``blocks.l.mlp.hook_post``      ``mlp.down_proj``          consumer: W' = W diag(omega), b' = b + W beta
                                                           (hook_post is silu(gate) * up, the output of
                                                           no linear layer, but the input of exactly one)
``blocks.l.attn.hook_z``        ``attn.o_proj``            consumer
``blocks.l.attn.hook_v``        ``attn.v_proj``            producer (not with clip_qkv)
``blocks.l.attn.hook_q`` / k    ``attn.q_proj`` / k_proj   producer (not with qk_norm or clip_qkv)
``...experts.e.hook_out`` etc.  the expert's projections   same rules inside each expert
``blocks.l.mlp.hook_routed_out`` every expert's down_proj  omega only (beta would be scaled by routing)
``blocks.l.mlp.hook_shared_out`` ``shared_expert.down_proj`` producer
==============================  =========================  ==========================================

Residual-stream sites (`hook_resid_*`) and norm outputs are sums or nonlinear functions of many
layers' outputs and are not foldable; use `as_hooks` there. A fold that needs a bias creates
one (`nn.Linear` bias parameter). `save_pretrained` writes a bias the family's checkpoint format
has no key for (LLaDA, MMaDA and LLaDA-MoE layers, Dream's o_proj / MLP) to the sidecar
`diffusion_lens_biases.safetensors` beside the original-format weights, and `from_pretrained`
applies it: the saved folder reproduces the runtime map (docs/concepts.md, "Saving folded maps").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from diffusion_lens.core.deprecation import no_keywords_left, renamed_keyword
from diffusion_lens.steering._common import (
    Hook,
    check_strength,
    orthonormal_rows,
    schedule,
    unit,
)
from diffusion_lens.steering.collect import collect_activations
from diffusion_lens.steering.edits import EditHook, SiteEdit, fold_consumer, fold_producer, fold_rows

TransportKind = str  # "mean" | "gaussian" | "linear"
KINDS = ("mean", "gaussian", "linear")


# ----------------------------------------------------------------------------- the map
@dataclass
class AffineMap:
    """Per-site affine edits T(a) = omega * a + U (V^T a) + beta, with a strength and an optional support gate.

    The one intervention type of the package: `ablate`, `add`, `fit_transport`, `fold` and
    `orthogonalize_weights` all build or consume it, and every application runs the same
    `SiteEdit` formula (`diffusion_lens.steering.edits`). For each site, `omega[site]` has the
    activation's feature shape (a per-dimension map) or is a [d d] matrix acting as omega @ a
    (Linear-ACT with cross terms, or a map saved by an older version). `low_rank[site] = (U, V)`,
    both [d k], adds U (V^T a): directional ablation of orthonormal rows Q is omega = 1,
    U = -Q^T, V = Q^T, so a direction costs O(d) numbers, not a [d d] matrix. All tensors are kept
    in float64; hooks cast to the activation's dtype.

    Example:
        >>> amap = fit_transport("linear", src_acts, tgt_acts)        # {site: [n d]} each
        >>> out = model.generate(prompt, hooks=amap.as_hooks(strength=0.5))
        >>> fold(model, amap.with_strength(0.5))                       # same, with no hooks
    """

    omega: dict[str, Tensor]
    beta: dict[str, Tensor]
    kind: str = "custom"
    strength: float = 1.0
    support: Optional[dict[str, tuple[Tensor, Tensor]]] = None
    support_quantiles: Optional[tuple[float, float]] = None
    info: dict = field(default_factory=dict)
    low_rank: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.omega) != set(self.beta):
            raise ValueError(f"omega and beta must name the same sites; got {sorted(self.omega)} and {sorted(self.beta)}.")
        if not self.omega:
            raise ValueError("An AffineMap needs at least one site.")
        for site in self.omega:
            omega, beta = self.omega[site], self.beta[site]
            for name, t in (("omega", omega), ("beta", beta)):
                if not isinstance(t, Tensor) or not t.is_floating_point():
                    raise TypeError(f"{name}[{site!r}] must be a floating-point tensor; got {type(t).__name__}"
                                    + (f" of dtype {t.dtype}" if isinstance(t, Tensor) else "") + ".")
            if omega.shape != beta.shape and not _is_full(omega, beta):
                raise ValueError(
                    f"Site {site!r}: omega must have beta's shape {tuple(beta.shape)} (per-dimension map) or be "
                    f"[d d] = {(beta.numel(), beta.numel())} with a 1-D beta (full matrix); got {tuple(omega.shape)}."
                )
            self.omega[site], self.beta[site] = omega.double(), beta.double()
        for site, factors in self.low_rank.items():
            self.low_rank[site] = _check_low_rank(site, factors, self.beta.get(site))
        if self.support is not None:
            missing = set(self.omega) - set(self.support)
            if missing:
                raise ValueError(f"support is missing sites {sorted(missing)}.")
            for site, (lo, hi) in self.support.items():
                if lo.shape != self.beta[site].shape or hi.shape != self.beta[site].shape:
                    raise ValueError(
                        f"support[{site!r}] bounds must have shape {tuple(self.beta[site].shape)}; got "
                        f"{tuple(lo.shape)} and {tuple(hi.shape)}."
                    )
        self.strength = check_strength(self.strength)

    # -- construction helpers
    @classmethod
    def from_ablation(cls, direction: Float[Tensor, " d"], sites: Sequence[str]) -> "AffineMap":
        """Directional ablation as a map: omega = I - r r^T, beta = 0 (r normalised).

        Example:
            >>> amap = AffineMap.from_ablation(r, ["blocks.3.hook_attn_out", "blocks.3.hook_mlp_out"])
            >>> fold(model, amap)              # == ablating r at those two sites
        """
        return cls._projection(unit(direction)[None], sites)

    @classmethod
    def from_subspace_ablation(cls, basis: Float[Tensor, "k d"], sites: Sequence[str]) -> "AffineMap":
        """Ablation of the span of `basis` rows: x -> x - (x Q^T) Q with Q = orthonormalised rows (QR).

        Example:
            >>> amap = AffineMap.from_subspace_ablation(dirs.subspace(k=2), ["blocks.1.hook_mlp_out"])
            >>> hooks = amap.as_hooks()
        """
        return cls._projection(orthonormal_rows(basis), sites)

    @classmethod
    def _projection(cls, q: Tensor, sites: Sequence[str]) -> "AffineMap":
        """omega = 1, beta = 0, U = -Q^T, V = Q^T at each site (rank k, O(d k) numbers per site)."""
        d = q.shape[1]
        ones, zeros = (torch.full((d,), value, dtype=torch.float64, device=q.device) for value in (1.0, 0.0))
        return cls({s: ones.clone() for s in sites}, {s: zeros.clone() for s in sites}, kind="ablation",
                   low_rank={s: (-q.T.contiguous(), q.T.contiguous()) for s in sites})

    @classmethod
    def from_addition(cls, vector: Float[Tensor, " d"], alpha: float, sites: Sequence[str]) -> "AffineMap":
        """Activation addition as a map: omega = 1, beta = alpha * vector.

        Example:
            >>> amap = AffineMap.from_addition(diff, 1.0, ["blocks.2.hook_mlp_out"])
            >>> fold(model, amap)
        """
        v = vector.detach().double()
        return cls({s: torch.ones_like(v) for s in sites}, {s: alpha * v for s in sites}, kind="addition")

    # -- inspection
    @property
    def sites(self) -> list[str]:
        return list(self.omega)

    @property
    def is_gated(self) -> bool:
        return self.support is not None

    def with_strength(self, strength: float) -> "AffineMap":
        """A copy with another default strength lambda in [0, 1].

        Example:
            >>> half = amap.with_strength(0.5)
            >>> half.coefficients(half.sites[0])   # omega_l, beta_l
        """
        return replace(self, strength=check_strength(strength))

    def edit(self, site: str, strength: Optional[float] = None) -> SiteEdit:
        """The `SiteEdit` that hooks and folds apply at `site` at strength l (identity parts dropped).

        Example:
            >>> amap.edit("blocks.1.hook_mlp_out", strength=0.5).rank    # 0 for transport maps
        """
        self._check_site(site)
        lam = self.strength if strength is None else check_strength(strength)
        omega, beta = self.omega[site], self.beta[site]
        u, v = self.low_rank.get(site, (None, None))
        edit = SiteEdit(tuple(beta.shape), omega, beta, u, v).at_strength(lam)
        identity = not edit.full and bool((edit.omega == 1).all())
        return replace(edit, omega=None if identity else edit.omega, beta=edit.beta if bool(edit.beta.any()) else None)

    def without_support(self) -> "AffineMap":
        """The same map with the support gate removed (so that it can be folded).

        Example:
            >>> fold(model, gated_map.without_support())
            >>> gated_map.is_gated, gated_map.without_support().is_gated   # True, False
        """
        return replace(self, support=None, support_quantiles=None)

    def coefficients(self, site: str, strength: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """(omega_l, beta_l) at strength l: omega_l = l omega + (1 - l), beta_l = l beta (float64).

        A site with a low-rank term returns it as a dense [d d] omega_l (l U V^T added): an explicit
        request for the matrix; hooks and folds keep the low-rank form (`edit`).

        Example:
            >>> omega_l, beta_l = amap.coefficients("blocks.1.hook_mlp_out", strength=0.3)
            >>> torch.allclose(omega_l * a + beta_l, 0.7 * a + 0.3 * (omega * a + beta))
        """
        self._check_site(site)
        lam = self.strength if strength is None else check_strength(strength)
        omega, beta = self.omega[site], self.beta[site]
        identity = torch.eye(omega.shape[0], dtype=omega.dtype) if _is_full(omega, beta) else torch.ones_like(omega)
        omega_l = lam * omega + (1.0 - lam) * identity
        if site in self.low_rank:
            u, v = self.low_rank[site]
            omega_l = (omega_l if _is_full(omega, beta) else torch.diag(omega_l)) + lam * (u @ v.T)
        return omega_l, lam * beta

    def apply(self, site: str, act: Tensor, strength: Optional[float] = None) -> Tensor:
        """T_l(act) for activations [..., *feature_shape] at `site` (gate included), in act's dtype.

        Example:
            >>> mapped = amap.apply("blocks.1.hook_mlp_out", acts)           # acts [n d]
            >>> mapped.mean(0)  # ~ the target mean for Mean-ACT / Gaussian maps
        """
        return self._hook(site, strength)(act)

    def as_hooks(
        self,
        strength: Optional[float] = None,
        *,
        steps: Any = None,
        positions: Any = None,
        denoise_blocks: Any = None,
        passes: Any = None,
        **deprecated: Any,
    ) -> list[Hook]:
        """Hook list applying the map at every site (restricted to `steps` / `denoise_blocks` /
        `positions` / model `passes` if given, with `diffusion_lens.denoising.hooks.at` semantics;
        `blocks=` is the old name of `denoise_blocks=`).

        Example:
            >>> hooks = amap.as_hooks(strength=0.4)
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            >>> out = model.generate(prompt, hooks=amap.as_hooks(0.4, steps=range(4)))
            >>> enc = amap.as_hooks(passes="encoder")   # DiffusionGemma: the prompt / committed-block pass only
        """
        denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="AffineMap.as_hooks")
        no_keywords_left(deprecated, "AffineMap.as_hooks")
        hooks = [(site, self._hook(site, strength)) for site in self.sites]
        return schedule(hooks, steps, positions, denoise_blocks, passes)

    def _hook(self, site: str, strength: Optional[float]) -> EditHook:
        support = None if self.support is None else self.support[site]
        return EditHook(self.edit(site, strength), f"AffineMap ({self.kind})", support)

    def to(self, device: Union[str, torch.device]) -> "AffineMap":
        """A copy with every tensor on `device` (hooks cast lazily anyway; this moves the storage).

        Example:
            >>> amap = amap.to("cuda")
            >>> amap.omega[amap.sites[0]].device
        """
        support = None if self.support is None else {s: (lo.to(device), hi.to(device)) for s, (lo, hi) in self.support.items()}
        return replace(
            self, omega={s: t.to(device) for s, t in self.omega.items()},
            beta={s: t.to(device) for s, t in self.beta.items()}, support=support,
            low_rank={s: (u.to(device), v.to(device)) for s, (u, v) in self.low_rank.items()},
        )

    def save(self, path) -> None:
        """Write the map to a safetensors file (tensors plus kind / strength / quantiles as metadata).

        Example:
            >>> amap.save("ifeval_linear.safetensors")
            >>> AffineMap.load("ifeval_linear.safetensors").sites
        """
        tensors = {}
        for site in self.sites:
            tensors[f"omega/{site}"] = self.omega[site].contiguous().cpu()
            tensors[f"beta/{site}"] = self.beta[site].contiguous().cpu()
            if site in self.low_rank:
                tensors[f"u/{site}"] = self.low_rank[site][0].contiguous().cpu()
                tensors[f"v/{site}"] = self.low_rank[site][1].contiguous().cpu()
            if self.support is not None:
                tensors[f"lo/{site}"] = self.support[site][0].contiguous().cpu()
                tensors[f"hi/{site}"] = self.support[site][1].contiguous().cpu()
        meta = {"kind": self.kind, "strength": str(self.strength), "sites": json.dumps(self.sites),
                "support_quantiles": json.dumps(self.support_quantiles)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "AffineMap":
        """Read a map written by `save`.

        Example:
            >>> amap = AffineMap.load("ifeval_linear.safetensors")
            >>> hooks = amap.as_hooks()
        """
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            sites = json.loads(meta["sites"])
            omega = {s: f.get_tensor(f"omega/{s}") for s in sites}
            beta = {s: f.get_tensor(f"beta/{s}") for s in sites}
            keys = set(f.keys())
            low_rank = {s: (f.get_tensor(f"u/{s}"), f.get_tensor(f"v/{s}")) for s in sites if f"u/{s}" in keys}
            support = None
            if f"lo/{sites[0]}" in keys:
                support = {s: (f.get_tensor(f"lo/{s}"), f.get_tensor(f"hi/{s}")) for s in sites}
        quantiles = json.loads(meta["support_quantiles"])
        return cls(omega, beta, kind=meta["kind"], strength=float(meta["strength"]), support=support,
                   support_quantiles=None if quantiles is None else tuple(quantiles), low_rank=low_rank)

    def _check_site(self, site: str) -> None:
        if site not in self.omega:
            raise KeyError(f"This AffineMap has no site {site!r}; its sites are {self.sites}.")

    def __repr__(self) -> str:
        gate = f", support={self.support_quantiles}" if self.is_gated else ""
        rank = f", rank={sorted({u.shape[1] for u, _ in self.low_rank.values()})}" if self.low_rank else ""
        return f"AffineMap(kind={self.kind!r}, sites={self.sites}, strength={self.strength}{rank}{gate})"


def _is_full(omega: Tensor, beta: Tensor) -> bool:
    return beta.ndim == 1 and omega.ndim == 2 and omega.shape == (beta.shape[0], beta.shape[0])


def _check_low_rank(site: str, factors: Any, beta: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(U, V) as float64 [d k] each, for a site with a 1-D beta [d]."""
    if beta is None:
        raise ValueError(f"low_rank names site {site!r}, which omega and beta do not have.")
    if not (isinstance(factors, tuple) and len(factors) == 2 and all(isinstance(t, Tensor) and t.is_floating_point() for t in factors)):
        raise TypeError(f"low_rank[{site!r}] must be a pair (U, V) of floating-point tensors [d k].")
    u, v = factors
    if beta.ndim != 1 or u.ndim != 2 or u.shape != v.shape or u.shape[0] != beta.shape[0]:
        raise ValueError(
            f"low_rank[{site!r}]: U and V must both be [d k] with d = {beta.numel()} (a 1-D site); got "
            f"{tuple(u.shape)} and {tuple(v.shape)} for a site of shape {tuple(beta.shape)}."
        )
    return u.double(), v.double()


# ----------------------------------------------------------------------------- fitting
def fit_transport(
    kind: TransportKind,
    source: Union[Mapping[str, Tensor], Tensor, Sequence],
    target: Union[Mapping[str, Tensor], Tensor, Sequence],
    *,
    sites: Optional[Sequence[str]] = None,
    pooling: Any = "mean_all",
    support: Union[None, str, tuple[float, float]] = None,
    min_std: float = 1e-4,
    model=None,
    **collect_kwargs,
) -> AffineMap:
    """Fit a transport map from source activations to target activations, per site.

    `source` / `target` are either activations already collected -- a dict {site: [n *feature]}
    or one tensor [n *feature] with `sites=[name]` -- or prompts (strings or token tensors), in
    which case `model=` is required and activations are collected at `sites` with `pooling`
    ("mean_all" = mean over the whole step-0 canvas, prompt and masked response, as in Lek et al.;
    see `collect_activations` for every option; extra keyword arguments such as `gen_length`, or
    `pass_name=` / `seed=` on a multi-pass model such as DiffusionGemma, go there). Returns an
    `AffineMap` at strength 1.

    Example:
        >>> src = {"blocks.1.hook_mlp_out": neg_acts}; tgt = {"blocks.1.hook_mlp_out": pos_acts}
        >>> amap = fit_transport("gaussian", src, tgt)
        >>> amap = fit_transport("linear", neg_prompts, pos_prompts, model=model, sites=sites)
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown transport kind {kind!r}; expected one of {KINDS}.")
    src = _as_site_samples(source, sites, "source", model, pooling, collect_kwargs)
    tgt = _as_site_samples(target, sites, "target", model, pooling, collect_kwargs)
    if set(src) != set(tgt):
        raise ValueError(f"source and target must cover the same sites; got {sorted(src)} and {sorted(tgt)}.")
    quantiles = _support_quantiles(support)
    omega, beta, gate = {}, {}, {} if quantiles else None
    for site in src:
        xs, xt = src[site], tgt[site]
        if xs.shape[1:] != xt.shape[1:]:
            raise ValueError(
                f"Site {site!r}: source samples have feature shape {tuple(xs.shape[1:])}, target samples "
                f"{tuple(xt.shape[1:])}; they must match."
            )
        need = 2 if kind != "mean" else 1
        if xs.shape[0] < need or xt.shape[0] < need:
            raise ValueError(f"Site {site!r}: {kind!r} transport needs at least {need} samples per side; got "
                             f"{xs.shape[0]} source and {xt.shape[0]} target.")
        feature_shape = xs.shape[1:]
        xs64, xt64 = xs.detach().double().flatten(1), xt.detach().double().flatten(1)
        w, b = _FITTERS[kind](xs64, xt64, min_std)
        omega[site], beta[site] = w.reshape(feature_shape).cpu(), b.reshape(feature_shape).cpu()
        if quantiles:
            sorted_src = xs64.sort(dim=0).values
            lo, hi = (_quantile_sorted(sorted_src, q).reshape(feature_shape).cpu() for q in quantiles)
            gate[site] = (lo, hi)
    return AffineMap(omega, beta, kind=kind, support=gate, support_quantiles=quantiles,
                     info={"n_source": {s: src[s].shape[0] for s in src}, "n_target": {s: tgt[s].shape[0] for s in tgt}})


def _as_site_samples(value, sites, argument, model, pooling, collect_kwargs) -> dict[str, Tensor]:
    if isinstance(value, Mapping):
        out = dict(value)
        if sites is not None and set(sites) != set(out):
            raise ValueError(f"sites={list(sites)} but {argument} holds sites {sorted(out)}.")
    elif isinstance(value, Tensor) and value.is_floating_point():
        if sites is None or len(sites) != 1:
            raise ValueError(
                f"{argument} is a single tensor of activations, so pass exactly one site name: sites=['...']; "
                f"got sites={sites!r}."
            )
        out = {sites[0]: value}
    else:
        if model is None:
            raise TypeError(
                f"{argument} looks like prompts ({type(value).__name__}); pass model= to collect activations, "
                "or pass activations as {site: tensor [n d]}."
            )
        if sites is None:
            raise ValueError("sites= is required when fitting from prompts (the hook points to map).")
        out = collect_activations(model, value, sites=list(sites), pooling=pooling, **collect_kwargs)
        per_position = pooling is not None and not (isinstance(pooling, str) and pooling.startswith("mean_"))
        if per_position:  # [n n_sel *feat]: every selected position of every prompt is a sample
            out = {site: acts.flatten(0, 1) for site, acts in out.items()}
    for site, t in out.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{argument}[{site!r}] must be a floating-point tensor of samples [n *feature]; got "
                            f"{type(t).__name__}" + (f" {t.dtype}" if isinstance(t, Tensor) else "") + ".")
        if t.ndim < 2:
            raise ValueError(f"{argument}[{site!r}] must be [n *feature] (n samples); got shape {tuple(t.shape)}.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{argument}[{site!r}] contains NaN or inf values.")
    if model is not None:
        model.check_hook_names(list(out))
    return out


def _fit_mean(xs: Tensor, xt: Tensor, min_std: float) -> tuple[Tensor, Tensor]:
    return torch.ones_like(xs[0]), xt.mean(0) - xs.mean(0)


def _fit_gaussian(xs: Tensor, xt: Tensor, min_std: float) -> tuple[Tensor, Tensor]:
    ms, mt = xs.mean(0), xt.mean(0)
    ss, st = xs.std(0, unbiased=False), xt.std(0, unbiased=False)
    usable = ss > min_std
    omega = torch.where(usable, st / ss.clamp_min(min_std), torch.ones_like(ss))
    beta = torch.where(usable, mt - omega * ms, torch.zeros_like(ms))
    return omega, beta


def _fit_linear(xs: Tensor, xt: Tensor, min_std: float) -> tuple[Tensor, Tensor]:
    n = min(xs.shape[0], xt.shape[0])
    x = _resample_sorted(xs.sort(dim=0).values, n)
    y = _resample_sorted(xt.sort(dim=0).values, n)
    mx, my = x.mean(0), y.mean(0)
    dx = x - mx
    var = (dx * dx).sum(0)
    usable = var > (min_std**2) * n
    omega = torch.where(usable, (dx * (y - my)).sum(0) / var.clamp_min(1e-300), torch.ones_like(var))
    beta = torch.where(usable, my - omega * mx, torch.zeros_like(mx))
    return omega, beta


_FITTERS = {"mean": _fit_mean, "gaussian": _fit_gaussian, "linear": _fit_linear}


def _resample_sorted(sorted_values: Tensor, n: int) -> Tensor:
    """Sorted samples [N d] read at n evenly spaced quantile levels (identity when N == n)."""
    count = sorted_values.shape[0]
    if count == n:
        return sorted_values
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.stack([_quantile_sorted(sorted_values, float(q)) for q in levels])


def _quantile_sorted(sorted_values: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile along dim 0 of already-sorted samples."""
    position = q * (sorted_values.shape[0] - 1)
    low = int(position)
    high = min(low + 1, sorted_values.shape[0] - 1)
    frac = position - low
    return sorted_values[low] * (1.0 - frac) + sorted_values[high] * frac


def _support_quantiles(support) -> Optional[tuple[float, float]]:
    if support is None:
        return None
    if support == "minmax":
        return (0.0, 1.0)
    if (
        isinstance(support, tuple) and len(support) == 2
        and all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in support)
        and 0.0 <= support[0] < support[1] <= 1.0
    ):
        return (float(support[0]), float(support[1]))
    raise ValueError(f"support must be None, 'minmax' or a pair of quantile levels (lo, hi) with 0 <= lo < hi <= 1; got {support!r}.")


# ----------------------------------------------------------------------------- folding
def fold(model, amap: AffineMap, strength: Optional[float] = None) -> list[str]:
    """Fold an ungated `AffineMap` into the model's weights, exactly; returns the edited parameter names.

    Each site is written into the linear layer that produces it (or, for `mlp.hook_post` and
    `attn.hook_z`, the one linear layer that consumes it); the module docstring lists the rules.
    Afterwards a plain forward equals a forward with `amap.as_hooks(strength)` (tested). Folding
    twice applies the map twice. Biases are created where needed; `save_pretrained` keeps those the
    checkpoint format cannot hold in a sidecar file that `from_pretrained` applies.

    Example:
        >>> amap = fit_transport("linear", src, tgt)           # sites: blocks.{l}.hook_mlp_out
        >>> fold(model, amap, strength=0.6)
        >>> model.generate(prompt)                             # steered, no hooks
        >>> model.save_pretrained("steered")                   # reloads to the same tokens
    """
    if not isinstance(amap, AffineMap):
        raise TypeError(f"fold needs an AffineMap; got {type(amap).__name__}.")
    if amap.is_gated:
        raise ValueError(
            "This AffineMap has a support gate, which is not affine and cannot be folded into weights; "
            "apply it with amap.as_hooks(), or fold amap.without_support()."
        )
    model.check_hook_names(amap.sites)
    plans = [(site, _fold_plan(model, site)) for site in amap.sites]  # validate every site before editing
    edited: list[str] = []
    for site, plan in plans:
        edited += plan(amap.edit(site, strength))
    return edited


def _fold_plan(model, site: str):
    """A function SiteEdit -> edited names for `site`, or a clear ValueError if not foldable."""
    prefix, _, hook = site.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    cfg = model.cfg
    path = (prefix + ".") if prefix else ""

    if site == "hook_embed":
        if cfg.tie_word_embeddings:
            raise ValueError("hook_embed cannot be folded in a model with tied embeddings: editing the embedding "
                             "would also change the unembedding. Use as_hooks() for this site.")
        return lambda e: fold_rows(model.embed, e, "embed.weight")
    if hook == "hook_attn_out" and hasattr(module, "attn"):
        return lambda e: fold_producer(module.attn.o_proj, e, f"{path}attn.o_proj")
    if hook == "hook_mlp_out" and hasattr(module, "mlp"):
        mlp = module.mlp
        if isinstance(getattr(mlp, "down_proj", None), nn.Linear):
            return lambda e: fold_producer(mlp.down_proj, e, f"{path}mlp.down_proj")
        return lambda e: _fold_mixture(mlp, e, f"{path}mlp")
    if hook == "hook_shared_out" and getattr(module, "shared_expert", None) is not None:
        return lambda e: fold_producer(module.shared_expert.down_proj, e, f"{path}shared_expert.down_proj")
    if hook == "hook_routed_out" and hasattr(module, "experts"):
        return lambda e: _fold_routed(module, e, f"{path}experts")
    if hook in ("hook_pre", "hook_pre_linear", "hook_post", "hook_out") and isinstance(getattr(module, "down_proj", None), nn.Linear):
        if hook == "hook_pre":
            return lambda e: fold_producer(module.gate_proj, e, f"{path}gate_proj")
        if hook == "hook_pre_linear":
            return lambda e: fold_producer(module.up_proj, e, f"{path}up_proj")
        if hook == "hook_post":
            return lambda e: fold_consumer(module.down_proj, e, f"{path}down_proj")
        return lambda e: fold_producer(module.down_proj, e, f"{path}down_proj")
    if hasattr(module, "o_proj") and hook in ("hook_z", "hook_q", "hook_k", "hook_v"):
        if hook == "hook_z":
            return lambda e: fold_consumer(module.o_proj, e, f"{path}o_proj")
        if cfg.clip_qkv is not None:
            raise ValueError(f"{site} cannot be folded: clip_qkv clamps q/k/v before the hook, so the hook is not "
                             "the output of a linear layer. Use as_hooks().")
        if hook in ("hook_q", "hook_k") and cfg.qk_norm:
            raise ValueError(f"{site} cannot be folded: with qk_norm the hook sees the normalised q/k, not a linear "
                             "layer's output. Use as_hooks().")
        linear = {"hook_q": module.q_proj, "hook_k": module.k_proj, "hook_v": module.v_proj}[hook]
        return lambda e: fold_producer(linear, e, f"{path}{hook[-1]}_proj")
    raise ValueError(
        f"{site} is not foldable: it is not the output of a single linear layer (residual-stream and norm sites "
        "are sums or nonlinear). Foldable: hook_embed, blocks.L.hook_attn_out, blocks.L.hook_mlp_out, "
        "blocks.L.mlp.hook_pre / hook_pre_linear / hook_post, blocks.L.attn.hook_z / hook_q / hook_k / hook_v, "
        "and the same MLP sites inside experts. Use amap.as_hooks() for other sites."
    )


def _fold_mixture(mlp: nn.Module, edit: SiteEdit, name: str) -> list[str]:
    """hook_mlp_out of a mixture of experts: sum_k g_k E_k(h) + S(h). omega distributes over the sum
    (into every down_proj); beta must be added once, so it goes into the shared expert's bias."""
    downs = [(n, m) for n, m in mlp.named_modules() if n.endswith("down_proj") and isinstance(m, nn.Linear)]
    if not downs:
        raise ValueError(f"Cannot fold hook_mlp_out into {name}: it has no down_proj layers.")
    shared = [(n, m) for n, m in downs if "shared" in n]
    if edit.beta is not None and len(shared) != 1:
        raise ValueError(
            f"Cannot fold a map with beta != 0 at the output of the mixture of experts {name}: without a shared "
            "expert, beta would be scaled by the routed weights (which need not sum to 1). Fold an omega-only map, "
            "or use as_hooks()."
        )
    edited = []
    without_beta = replace(edit, beta=None)
    for sub, linear in downs:
        edited += fold_producer(linear, edit if (sub, linear) in shared else without_beta, f"{name}.{sub}")
    return edited


def _fold_routed(moe: nn.Module, edit: SiteEdit, name: str) -> list[str]:
    """hook_routed_out = sum_k g_k E_k(h): omega folds into every routed expert; beta cannot."""
    if edit.beta is not None:
        raise ValueError(
            f"Cannot fold a map with beta != 0 at {name} (hook_routed_out): the routed weights need not sum to 1. "
            "Fold an omega-only map, or use as_hooks()."
        )
    edited = []
    for e, expert in enumerate(moe.experts):
        edited += fold_producer(expert.down_proj, edit, f"{name}.{e}.down_proj")
    return edited
