"""Directions from class means: difference of means, PCA of class activations, k-dim subspaces.

`mean_difference` runs one forward per prompt on the canvas the sampler starts from (prompt +
`gen_length` masks, denoising step 0), reads the chosen positions at every requested layer and
accumulates float64 running sums, so memory does not depend on the number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.steering._common import LayerSpec, resolve_layers, unit
from diffusion_lens.steering.activations import (
    PositionSpec,
    PromptsInput,
    check_position_spec,
    collect_activations,
    make_selector,
    position_labels,
    prepare_prompts,
    run_and_read,
    step0_canvases,
)


@dataclass
class Directions:
    """Class means and their difference per (layer, position): tensors [layer pos d_model], float64.

    `directions` (= `mean_positive - mean_negative`) are raw, unnormalised differences;
    `norms` [layer pos] their norms; `cosine` [layer pos] the cosine between the two class means.
    `layers` are model layer indices, `positions` the position labels (offsets such as -1, or
    names such as "post_instruction[-2]" / "mean_prompt"). `site` is the block hook read
    (`hook_resid_pre`, the block input, by default).

    Example:
        >>> dirs = mean_difference(model, harmful, harmless, layers="all", positions="post_instruction")
        >>> dirs.directions.shape, dirs.norms.shape          # [layer pos d_model], [layer pos]
        >>> r = dirs.unit(layer=12, pos="post_instruction[-1]")
    """

    mean_positive: Float[Tensor, "layer pos d_model"]
    mean_negative: Float[Tensor, "layer pos d_model"]
    layers: list[int]
    positions: list
    site: str = "hook_resid_pre"
    step: int = 0
    n_positive: int = 0
    n_negative: int = 0
    second_moment_positive: Optional[Float[Tensor, "layer pos d_model d_model"]] = field(default=None, repr=False)

    @property
    def directions(self) -> Float[Tensor, "layer pos d_model"]:
        return self.mean_positive - self.mean_negative

    @property
    def norms(self) -> Float[Tensor, "layer pos"]:
        return self.directions.norm(dim=-1)

    @property
    def cosine(self) -> Float[Tensor, "layer pos"]:
        return torch.nn.functional.cosine_similarity(self.mean_positive, self.mean_negative, dim=-1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean_positive.shape)

    def _index(self, layer: int, pos: Any) -> tuple[int, int]:
        if layer not in self.layers:
            raise KeyError(f"Layer {layer} was not computed; these directions cover layers {self.layers}.")
        if pos is None:
            if len(self.positions) != 1:
                raise ValueError(f"Name a position: these directions cover {self.positions}.")
            return self.layers.index(layer), 0
        if pos not in self.positions:
            raise KeyError(f"Position {pos!r} was not computed; positions are {self.positions}.")
        return self.layers.index(layer), self.positions.index(pos)

    def vector(self, layer: int, pos: Any = None) -> Float[Tensor, " d_model"]:
        """The raw mean difference at (layer, position label); float64.

        Example:
            >>> v = dirs.vector(6, -1)
            >>> hooks = add(model, v, alpha=1.0, layers=6)
        """
        i, j = self._index(layer, pos)
        return self.directions[i, j]

    def unit(self, layer: int, pos: Any = None) -> Float[Tensor, " d_model"]:
        """The normalised mean difference at (layer, position label).

        Example:
            >>> r = dirs.unit(6, -1)
            >>> hooks = ablate(model, r)
        """
        return unit(self.vector(layer, pos))

    def subspace(self, layer: int, pos: Any = None, k: int = 2) -> Float[Tensor, "k d_model"]:
        """Top-k eigenvectors of the difference covariance D = E_pos[(x - m_neg)(x - m_neg)^T] (rows).

        D's leading eigenvector is the mean-difference direction when the positive class varies
        little around its mean; the next ones add the directions along which positive activations
        spread away from the negative mean. Needs `mean_difference(..., subspace=True)`.

        Example:
            >>> dirs = mean_difference(model, pos, neg, layers=[6], positions=-1, subspace=True)
            >>> basis = dirs.subspace(6, -1, k=3)
            >>> hooks = ablate(model, basis)
        """
        if self.second_moment_positive is None:
            raise ValueError("These directions were computed without subspace=True; rerun mean_difference(..., subspace=True).")
        i, j = self._index(layer, pos)
        d = self.mean_positive.shape[-1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
            raise ValueError(f"k must be an int in 1..{d}; got {k!r}.")
        return difference_subspace(self.second_moment_positive[i, j], self.mean_positive[i, j], self.mean_negative[i, j], k)

    def direction_tensor(self) -> Float[Tensor, " d_model"]:
        """The only direction, when a single (layer, position) was computed (lets `ablate` take a Directions)."""
        if self.directions.shape[:2] != (1, 1):
            raise ValueError(
                f"These directions cover {len(self.layers)} layers x {len(self.positions)} positions; pick one with "
                "dirs.unit(layer, pos) or dirs.vector(layer, pos)."
            )
        return self.directions[0, 0]

    def __repr__(self) -> str:
        return (f"Directions(layers={self.layers}, positions={self.positions}, site={self.site!r}, step={self.step}, "
                f"n={self.n_positive}+{self.n_negative})")


def difference_subspace(second_moment, mean_pos, mean_neg, k: int) -> Float[Tensor, "k d"]:
    """Top-k eigenvectors of E_pos[(x - m_neg)(x - m_neg)^T] from E_pos[x x^T], m_pos, m_neg (float64).

    Example:
        >>> S = (xp.T @ xp) / len(xp)
        >>> difference_subspace(S, xp.mean(0), xn.mean(0), k=2).shape    # [2 d]
    """
    m_p, m_n = mean_pos.double(), mean_neg.double()
    D = second_moment.double() - torch.outer(m_n, m_p) - torch.outer(m_p, m_n) + torch.outer(m_n, m_n)
    D = 0.5 * (D + D.T)
    values, vectors = torch.linalg.eigh(D)
    top = vectors[:, values.argsort(descending=True)[:k]].T
    # sign convention: positive projection onto the mean difference
    signs = torch.sign(top @ (m_p - m_n))
    signs[signs == 0] = 1
    return top * signs[:, None]


class _RunningSum:
    """float64 running sum of [n, *shape] batches: memory of one sum, whatever the number of prompts."""

    def __init__(self):
        self.total: Optional[Tensor] = None
        self.count = 0

    def update(self, x: Tensor) -> None:
        s = x.double().sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[0]

    def mean(self) -> Tensor:
        return self.total / self.count


def _class_means(model, prepared, sites, spec, gen_length, batch_size, second_moment: bool):
    sums = {s: _RunningSum() for s in sites}
    squares = {s: _RunningSum() for s in sites} if second_moment else None
    for batch in step0_canvases(model, prepared, gen_length=gen_length, batch_size=batch_size):
        selector = make_selector(spec, batch, prepared.template)
        acts, _ = run_and_read(model, batch, sites, selector)
        for site in sites:
            x = acts[site]  # [b n_sel d] or [b d] pooled
            if x.ndim == 2:
                x = x[:, None]
            sums[site].update(x)
            if squares is not None:
                squares[site].update(torch.einsum("bpd,bpe->bpde", x, x))
    means = torch.stack([sums[s].mean() for s in sites])
    moments = None if squares is None else torch.stack([squares[s].mean() for s in sites])
    return means, moments


def mean_difference(
    model,
    positive: PromptsInput,
    negative: PromptsInput,
    *,
    layers: LayerSpec = "all",
    positions: PositionSpec = "post_instruction",
    step: int = 0,
    site: str = "hook_resid_pre",
    gen_length: int = 128,
    batch_size: int = 16,
    chat: Optional[bool] = None,
    subspace: bool = False,
) -> Directions:
    """Difference of class means of `site` activations per layer and position (float64, streaming).

    One forward per prompt on the step-0 canvas (prompt + `gen_length` masks), in batches of
    `batch_size`; running float64 sums keep memory independent of the number of prompts.
    `positions`: offsets from the prompt / response boundary (-1 = last prompt token, 0 = first
    masked position), "pre_instruction" / "post_instruction" (chat-template tokens, string
    prompts only), or pooled "mean_prompt" / "mean_response" / "mean_all". `subspace=True` also
    accumulates the positive class's second moment (d_model^2 floats per layer and position) for
    `Directions.subspace`. `step` other than 0 reads a later denoising step (needs `model.generate`).

    Example:
        >>> dirs = mean_difference(model, harmful, harmless, layers="all", positions="post_instruction")
        >>> dirs.cosine[:, -1]                           # cosine of class means per layer
        >>> r = dirs.unit(layer=14, pos="post_instruction[-1]")
    """
    if not isinstance(site, str) or not site.startswith("hook_"):
        raise ValueError(f"site must be a block hook name such as 'hook_resid_pre'; got {site!r}.")
    layer_list = resolve_layers(model, layers)
    sites = [f"blocks.{layer}.{site}" for layer in layer_list]
    model.check_hook_names(sites)
    pos_prompts = prepare_prompts(model, positive, chat=chat, argument="positive")
    neg_prompts = prepare_prompts(model, negative, chat=chat, argument="negative")
    for prepared in (pos_prompts, neg_prompts):
        check_position_spec(positions, prepared)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0; got {step!r}.")
    if step != 0:
        from diffusion_lens.steering._stepwise import class_means_at_step

        mp, sp = class_means_at_step(model, pos_prompts, sites, positions, step, gen_length, batch_size, subspace)
        mn, _ = class_means_at_step(model, neg_prompts, sites, positions, step, gen_length, batch_size, False)
    else:
        mp, sp = _class_means(model, pos_prompts, sites, positions, gen_length, batch_size, subspace)
        mn, _ = _class_means(model, neg_prompts, sites, positions, gen_length, batch_size, False)
    if pos_prompts.template is not None and neg_prompts.template is not None:
        labels = position_labels(positions, pos_prompts.template)
    else:
        labels = position_labels(positions, pos_prompts.template or neg_prompts.template)
    return Directions(
        mean_positive=mp, mean_negative=mn, layers=layer_list, positions=labels, site=site, step=step,
        n_positive=len(pos_prompts), n_negative=len(neg_prompts), second_moment_positive=sp,
    )


@dataclass
class PCAResult:
    """PCA of two classes' activations at one site: `components` [k d] (rows), their explained
    variance ratio [k], and each class's coordinates [n k] (centred on the pooled mean)."""

    components: Float[Tensor, "k d_model"]
    explained_variance_ratio: Float[Tensor, " k"]
    positive: Float[Tensor, "n_pos k"]
    negative: Float[Tensor, "n_neg k"]
    mean: Float[Tensor, " d_model"]
    layer: int
    position: Any


def class_pca(
    model,
    positive: PromptsInput,
    negative: PromptsInput,
    *,
    layer: int,
    position: PositionSpec = -1,
    k: int = 2,
    site: str = "hook_resid_pre",
    gen_length: int = 128,
    batch_size: int = 16,
    chat: Optional[bool] = None,
) -> PCAResult:
    """PCA of the pooled activations of both classes at one layer and one position.

    Keeps [n d_model] per class in memory (it is meant for plotting). `position` must select a
    single position (one offset or a pooled name).

    Example:
        >>> res = class_pca(model, harmful, harmless, layer=10, position=-1)
        >>> fig = diffusion_lens.plot.pca_scatter(res)
        >>> res.explained_variance_ratio
    """
    (layer,) = resolve_layers(model, [layer], argument="layer")
    name = f"blocks.{layer}.{site}"
    if isinstance(position, (list, tuple)) and len(position) != 1:
        raise ValueError(f"class_pca needs one position; got {position!r}.")
    if isinstance(position, str) and position not in ("mean_prompt", "mean_response", "mean_all"):
        raise ValueError("class_pca needs one position: an offset or 'mean_prompt' / 'mean_response' / 'mean_all'.")
    acts = []
    for prompts, argument in ((positive, "positive"), (negative, "negative")):
        x = collect_activations(model, prompts, sites=[name], pooling=position, gen_length=gen_length,
                                batch_size=batch_size, chat=chat)[name]
        acts.append(x.reshape(x.shape[0], -1))
    xp, xn = acts
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(xp.shape[1], xp.shape[0] + xn.shape[0]):
        raise ValueError(f"k must be an int in 1..min(d_model, n_samples); got {k!r}.")
    pooled = torch.cat([xp, xn])
    mean = pooled.mean(0)
    _, s, vh = torch.linalg.svd(pooled - mean, full_matrices=False)
    var = s**2
    ratio = var[:k] / var.sum().clamp_min(1e-300)
    comps = vh[:k]
    return PCAResult(comps, ratio, (xp - mean) @ comps.T, (xn - mean) @ comps.T, mean, layer, position)


__all__ = ["Directions", "PCAResult", "class_pca", "difference_subspace", "mean_difference"]
