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

`fold(model, map)` writes an ungated map into a linear layer, exactly (zero inference overhead).
Foldable sites, and the layer each folds into:

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

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffusion_lens.steering._common import (
    Hook,
    check_strength,
    orthonormal_rows,
    schedule,
    unit,
)

TransportKind = str  # "mean" | "gaussian" | "linear"
KINDS = ("mean", "gaussian", "linear")


# ----------------------------------------------------------------------------- the map
@dataclass
class AffineMap:
    """Per-site affine maps T(a) = omega * a + beta, with a strength and an optional support gate.

    For each site, `omega[site]` has the activation's feature shape (a per-dimension map) or is a
    [d d] matrix acting as T(a) = omega @ a + beta (used for directional ablation,
    omega = I - r r^T). All tensors are kept in float64; hooks cast to the activation's dtype.

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
        r = unit(direction)
        omega = torch.eye(r.numel(), dtype=torch.float64) - torch.outer(r, r)
        zero = torch.zeros_like(r)
        return cls({s: omega.clone() for s in sites}, {s: zero.clone() for s in sites}, kind="ablation")

    @classmethod
    def from_subspace_ablation(cls, basis: Float[Tensor, "k d"], sites: Sequence[str]) -> "AffineMap":
        """Ablation of the span of `basis` rows: omega = I - Q^T Q.

        Example:
            >>> amap = AffineMap.from_subspace_ablation(dirs.subspace(k=2), ["blocks.1.hook_mlp_out"])
            >>> hooks = amap.as_hooks()
        """
        q = orthonormal_rows(basis)
        omega = torch.eye(q.shape[1], dtype=torch.float64) - q.T @ q
        zero = torch.zeros(q.shape[1], dtype=torch.float64)
        return cls({s: omega.clone() for s in sites}, {s: zero.clone() for s in sites}, kind="ablation")

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

    def without_support(self) -> "AffineMap":
        """The same map with the support gate removed (so that it can be folded).

        Example:
            >>> fold(model, gated_map.without_support())
            >>> gated_map.is_gated, gated_map.without_support().is_gated   # True, False
        """
        return replace(self, support=None, support_quantiles=None)

    def coefficients(self, site: str, strength: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """(omega_l, beta_l) at strength l: omega_l = l omega + (1 - l), beta_l = l beta (float64).

        Example:
            >>> omega_l, beta_l = amap.coefficients("blocks.1.hook_mlp_out", strength=0.3)
            >>> torch.allclose(omega_l * a + beta_l, 0.7 * a + 0.3 * (omega * a + beta))
        """
        self._check_site(site)
        lam = self.strength if strength is None else check_strength(strength)
        omega, beta = self.omega[site], self.beta[site]
        identity = torch.eye(omega.shape[0], dtype=omega.dtype) if _is_full(omega, beta) else torch.ones_like(omega)
        return lam * omega + (1.0 - lam) * identity, lam * beta

    def apply(self, site: str, act: Tensor, strength: Optional[float] = None) -> Tensor:
        """T_l(act) for activations [..., *feature_shape] at `site` (gate included), in act's dtype.

        Example:
            >>> mapped = amap.apply("blocks.1.hook_mlp_out", acts)           # acts [n d]
            >>> mapped.mean(0)  # ~ the target mean for Mean-ACT / Gaussian maps
        """
        return _MapHook(self, site, strength)(act)

    def as_hooks(
        self, strength: Optional[float] = None, *, steps: Any = None, positions: Any = None, blocks: Any = None
    ) -> list[Hook]:
        """Hook list applying the map at every site (restricted to `steps` / `blocks` / `positions`
        if given, with `diffusion_lens.denoising.hooks.at` semantics).

        Example:
            >>> hooks = amap.as_hooks(strength=0.4)
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            >>> out = model.generate(prompt, hooks=amap.as_hooks(0.4, steps=range(4)))
        """
        hooks = [(site, _MapHook(self, site, strength)) for site in self.sites]
        return schedule(hooks, steps, positions, blocks)

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
        )

    def save(self, path) -> None:
        """Write the map to a safetensors file (tensors plus kind / strength / quantiles as metadata).

        Example:
            >>> amap.save("ifeval_linear.safetensors")
            >>> AffineMap.load("ifeval_linear.safetensors").sites
        """
        import json

        from safetensors.torch import save_file

        tensors = {}
        for site in self.sites:
            tensors[f"omega/{site}"] = self.omega[site].contiguous().cpu()
            tensors[f"beta/{site}"] = self.beta[site].contiguous().cpu()
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
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            sites = json.loads(meta["sites"])
            omega = {s: f.get_tensor(f"omega/{s}") for s in sites}
            beta = {s: f.get_tensor(f"beta/{s}") for s in sites}
            support = None
            if f"lo/{sites[0]}" in f.keys():
                support = {s: (f.get_tensor(f"lo/{s}"), f.get_tensor(f"hi/{s}")) for s in sites}
        quantiles = json.loads(meta["support_quantiles"])
        return cls(omega, beta, kind=meta["kind"], strength=float(meta["strength"]), support=support,
                   support_quantiles=None if quantiles is None else tuple(quantiles))

    def _check_site(self, site: str) -> None:
        if site not in self.omega:
            raise KeyError(f"This AffineMap has no site {site!r}; its sites are {self.sites}.")

    def __repr__(self) -> str:
        gate = f", support={self.support_quantiles}" if self.is_gated else ""
        return f"AffineMap(kind={self.kind!r}, sites={self.sites}, strength={self.strength}{gate})"


def _is_full(omega: Tensor, beta: Tensor) -> bool:
    return beta.ndim == 1 and omega.ndim == 2 and omega.shape == (beta.shape[0], beta.shape[0])


class _MapHook:
    """Hook function for one site of an AffineMap (casts the coefficients once per dtype/device)."""

    def __init__(self, amap: AffineMap, site: str, strength: Optional[float]):
        self.site = site
        self.omega, self.beta = amap.coefficients(site, strength)
        self.full = _is_full(self.omega, self.beta)
        self.support = None if amap.support is None else amap.support[site]
        self._cast: dict[tuple, tuple] = {}

    def _get(self, act: Tensor):
        dtype = torch.float32 if act.dtype in (torch.float16, torch.bfloat16) else act.dtype
        key = (act.device, dtype)
        if key not in self._cast:
            support = None if self.support is None else tuple(t.to(act.device, dtype) for t in self.support)
            self._cast[key] = (self.omega.to(act.device, dtype), self.beta.to(act.device, dtype), support)
        return self._cast[key]

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        feature_shape = tuple(self.beta.shape)
        if tuple(act.shape[act.ndim - len(feature_shape):]) != feature_shape:
            raise ValueError(
                f"AffineMap site {self.site!r}: the activation has shape {tuple(act.shape)}, expected trailing "
                f"dimensions {feature_shape}."
            )
        omega, beta, support = self._get(act)
        x = act.to(omega.dtype)
        mapped = (x @ omega.T if self.full else x * omega) + beta
        if support is not None:
            inside = (x >= support[0]) & (x <= support[1])
            mapped = torch.where(inside, mapped, x)
        return mapped.to(act.dtype)


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
    see `collect_activations` for every option; extra keyword arguments such as `gen_length` go
    there). Returns an `AffineMap` at strength 1.

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
        from diffusion_lens.steering.activations import collect_activations

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
        omega, beta = amap.coefficients(site, strength)
        edited += plan(omega, beta)
    return edited


def _fold_plan(model, site: str):
    """A function (omega, beta) -> edited names for `site`, or a clear ValueError if not foldable."""
    prefix, _, hook = site.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    cfg = model.cfg
    path = (prefix + ".") if prefix else ""

    if site == "hook_embed":
        if cfg.tie_word_embeddings:
            raise ValueError("hook_embed cannot be folded in a model with tied embeddings: editing the embedding "
                             "would also change the unembedding. Use as_hooks() for this site.")
        return lambda w, b: _fold_embedding(model.embed, w, b, "embed.weight")
    if hook == "hook_attn_out" and hasattr(module, "attn"):
        return lambda w, b: _fold_producer(module.attn.o_proj, w, b, f"{path}attn.o_proj")
    if hook == "hook_mlp_out" and hasattr(module, "mlp"):
        mlp = module.mlp
        if isinstance(getattr(mlp, "down_proj", None), nn.Linear):
            return lambda w, b: _fold_producer(mlp.down_proj, w, b, f"{path}mlp.down_proj")
        return lambda w, b: _fold_mixture(mlp, w, b, f"{path}mlp")
    if hook == "hook_shared_out" and getattr(module, "shared_expert", None) is not None:
        return lambda w, b: _fold_producer(module.shared_expert.down_proj, w, b, f"{path}shared_expert.down_proj")
    if hook == "hook_routed_out" and hasattr(module, "experts"):
        return lambda w, b: _fold_routed(module, w, b, f"{path}experts")
    if hook in ("hook_pre", "hook_pre_linear", "hook_post", "hook_out") and isinstance(getattr(module, "down_proj", None), nn.Linear):
        if hook == "hook_pre":
            return lambda w, b: _fold_producer(module.gate_proj, w, b, f"{path}gate_proj")
        if hook == "hook_pre_linear":
            return lambda w, b: _fold_producer(module.up_proj, w, b, f"{path}up_proj")
        if hook == "hook_post":
            return lambda w, b: _fold_consumer(module.down_proj, w, b, f"{path}down_proj")
        return lambda w, b: _fold_producer(module.down_proj, w, b, f"{path}down_proj")
    if hasattr(module, "o_proj") and hook in ("hook_z", "hook_q", "hook_k", "hook_v"):
        if hook == "hook_z":
            return lambda w, b: _fold_consumer(module.o_proj, w, b, f"{path}o_proj")
        if cfg.clip_qkv is not None:
            raise ValueError(f"{site} cannot be folded: clip_qkv clamps q/k/v before the hook, so the hook is not "
                             "the output of a linear layer. Use as_hooks().")
        if hook in ("hook_q", "hook_k") and cfg.qk_norm:
            raise ValueError(f"{site} cannot be folded: with qk_norm the hook sees the normalised q/k, not a linear "
                             "layer's output. Use as_hooks().")
        linear = {"hook_q": module.q_proj, "hook_k": module.k_proj, "hook_v": module.v_proj}[hook]
        return lambda w, b: _fold_producer(linear, w, b, f"{path}{hook[-1]}_proj")
    raise ValueError(
        f"{site} is not foldable: it is not the output of a single linear layer (residual-stream and norm sites "
        "are sums or nonlinear). Foldable: hook_embed, blocks.L.hook_attn_out, blocks.L.hook_mlp_out, "
        "blocks.L.mlp.hook_pre / hook_pre_linear / hook_post, blocks.L.attn.hook_z / hook_q / hook_k / hook_v, "
        "and the same MLP sites inside experts. Use amap.as_hooks() for other sites."
    )


def _flat(omega: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, bool]:
    if _is_full(omega, beta):
        return omega, beta, True
    return omega.reshape(-1), beta.reshape(-1), False


def _check_features(linear: nn.Linear, size: int, side: str, name: str, n: int) -> None:
    if size != n:
        raise ValueError(f"Cannot fold into {name}: the map has {n} features, the layer's {side} has {size}.")


@torch.no_grad()
def _fold_producer(linear: nn.Linear, omega: Tensor, beta: Tensor, name: str) -> list[str]:
    """y = W x + b  ->  omega * y + beta  =  (diag(omega) W) x + (omega * b + beta)."""
    omega, beta, full = _flat(omega, beta)
    _check_features(linear, linear.out_features, "output", name, beta.numel())
    w64 = linear.weight.double()
    omega, beta = omega.to(w64.device), beta.to(w64.device)
    new_w = omega @ w64 if full else omega[:, None] * w64
    bias = torch.zeros_like(beta) if linear.bias is None else linear.bias.double()
    new_b = (omega @ bias if full else omega * bias) + beta
    linear.weight.copy_(new_w.to(linear.weight.dtype))
    return [f"{name}.weight"] + _set_bias(linear, new_b, name)


@torch.no_grad()
def _fold_consumer(linear: nn.Linear, omega: Tensor, beta: Tensor, name: str) -> list[str]:
    """y = W (omega * x + beta) + b  =  (W diag(omega)) x + (W beta + b)."""
    omega, beta, full = _flat(omega, beta)
    _check_features(linear, linear.in_features, "input", name, beta.numel())
    w64 = linear.weight.double()
    omega, beta = omega.to(w64.device), beta.to(w64.device)
    new_w = w64 @ omega if full else w64 * omega[None, :]
    bias = torch.zeros(linear.out_features, dtype=torch.float64, device=w64.device) if linear.bias is None else linear.bias.double()
    new_b = bias + w64 @ beta
    linear.weight.copy_(new_w.to(linear.weight.dtype))
    return [f"{name}.weight"] + _set_bias(linear, new_b, name)


def _set_bias(linear: nn.Linear, new_b: Tensor, name: str) -> list[str]:
    if linear.bias is None:
        if not bool(new_b.abs().max() > 0):
            return []
        linear.bias = nn.Parameter(new_b.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(new_b.to(linear.bias.dtype))
    return [f"{name}.bias"]


@torch.no_grad()
def _fold_embedding(embed: nn.Embedding, omega: Tensor, beta: Tensor, name: str) -> list[str]:
    omega, beta, full = _flat(omega, beta)
    if beta.numel() != embed.weight.shape[1]:
        raise ValueError(f"Cannot fold into {name}: the map has {beta.numel()} features, d_model is {embed.weight.shape[1]}.")
    e64 = embed.weight.double()
    omega, beta = omega.to(e64.device), beta.to(e64.device)
    new = (e64 @ omega.T if full else e64 * omega) + beta
    embed.weight.copy_(new.to(embed.weight.dtype))
    return [name]


def _fold_mixture(mlp: nn.Module, omega: Tensor, beta: Tensor, name: str) -> list[str]:
    """hook_mlp_out of a mixture of experts: sum_k g_k E_k(h) + S(h). omega distributes over the sum
    (into every down_proj); beta must be added once, so it goes into the shared expert's bias."""
    downs = [(n, m) for n, m in mlp.named_modules() if n.endswith("down_proj") and isinstance(m, nn.Linear)]
    if not downs:
        raise ValueError(f"Cannot fold hook_mlp_out into {name}: it has no down_proj layers.")
    shared = [(n, m) for n, m in downs if "shared" in n]
    has_beta = bool(beta.abs().max() > 0)
    if has_beta and len(shared) != 1:
        raise ValueError(
            f"Cannot fold a map with beta != 0 at the output of the mixture of experts {name}: without a shared "
            "expert, beta would be scaled by the routed weights (which need not sum to 1). Fold an omega-only map, "
            "or use as_hooks()."
        )
    edited = []
    zero = torch.zeros_like(beta)
    for sub, linear in downs:
        edited += _fold_producer(linear, omega, beta if (sub, linear) in shared else zero, f"{name}.{sub}")
    return edited


def _fold_routed(moe: nn.Module, omega: Tensor, beta: Tensor, name: str) -> list[str]:
    """hook_routed_out = sum_k g_k E_k(h): omega folds into every routed expert; beta cannot."""
    if bool(beta.abs().max() > 0):
        raise ValueError(
            f"Cannot fold a map with beta != 0 at {name} (hook_routed_out): the routed weights need not sum to 1. "
            "Fold an omega-only map, or use as_hooks()."
        )
    edited = []
    for e, expert in enumerate(moe.experts):
        edited += _fold_producer(expert.down_proj, omega, beta, f"{name}.{e}.down_proj")
    return edited
