"""Directions from class means: difference of means, PCA of class activations, k-dim subspaces.

`mean_difference` runs one forward per prompt on the canvas the sampler starts from (prompt +
`gen_length` masks, denoising step 0) or at a later denoising step, or in one pass of a multi-pass
model (DiffusionGemma's "encoder" over the prompt, "decoder" over its noise canvas; `pass_name=`,
the forward `diffusion_lens.steering.collect.Reading` picks), and reads the chosen positions at
every requested layer with the streaming float64 reducers of `diffusion_lens.denoising`
(`StreamingMean`), so memory does not depend on the number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.results_io import load_result, save_result
from diffusion_lens.denoising import StreamingMean
from diffusion_lens.denoising import hooks as H
from diffusion_lens.prompts.batching import PromptsInput, batch_indices, check_batch_size, left_pad, prepare_prompts
from diffusion_lens.prompts.distributed import all_reduce_float64, my_batches, world
from diffusion_lens.steering._common import LayerSpec, progress_bar, require_pandas, resolve_layers, unit
from diffusion_lens.steering.collect import Reading, collect_activations
from diffusion_lens.steering.positions import (
    POOLED,
    PositionSpec,
    Positions,
    check_positions,
    parse_positions,
    selector,
)


@dataclass
class Directions:
    """Class means and their difference per (layer, position): tensors [layer pos d_model], float64.

    `directions` (= `mean_positive - mean_negative`) are raw, unnormalised differences;
    `norms` [layer pos] their norms; `cosine` [layer pos] the cosine between the two class means.
    `layers` are model layer indices, `positions` the position labels (the selectors asked for, such
    as "last_prompt" / "response[0]" / "mean_prompt", and "post_instruction[-2]" for template tokens;
    ints such as -1 in results of the deprecated int spelling). `site` is the block hook read
    (`hook_resid_pre`, the block input, by default); `step` and `pass_name` say which forward was
    read (as passed to `mean_difference`: step 0 with a pass is that pass's first forward).

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
    pass_name: Optional[str] = None

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
            >>> v = dirs.vector(6, "last_prompt")
            >>> hooks = add(model, v, alpha=1.0, layers=6)
        """
        i, j = self._index(layer, pos)
        return self.directions[i, j]

    def unit(self, layer: int, pos: Any = None) -> Float[Tensor, " d_model"]:
        """The normalised mean difference at (layer, position label).

        Example:
            >>> r = dirs.unit(6, "last_prompt")
            >>> hooks = ablate(model, r)
        """
        return unit(self.vector(layer, pos))

    def subspace(self, layer: int, pos: Any = None, k: int = 2) -> Float[Tensor, "k d_model"]:
        """Top-k eigenvectors of the difference covariance D = E_pos[(x - m_neg)(x - m_neg)^T] (rows).

        D's leading eigenvector is the mean-difference direction when the positive class varies
        little around its mean; the next ones add the directions along which positive activations
        spread away from the negative mean. Needs `mean_difference(..., subspace=True)`.

        Example:
            >>> dirs = mean_difference(model, pos, neg, layers=[6], positions="last_prompt", subspace=True)
            >>> basis = dirs.subspace(6, "last_prompt", k=3)
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
        """The only direction, when a single (layer, position) was computed (lets `ablate` take a Directions).

        Example:
            >>> dirs = mean_difference(model, pos, neg, layers=[6], positions="last_prompt")
            >>> hooks = ablate(model, dirs)            # same as ablate(model, dirs.vector(6, "last_prompt"))
        """
        if self.directions.shape[:2] != (1, 1):
            raise ValueError(
                f"These directions cover {len(self.layers)} layers x {len(self.positions)} positions; pick one with "
                "dirs.unit(layer, pos) or dirs.vector(layer, pos)."
            )
        return self.directions[0, 0]

    def __repr__(self) -> str:
        in_pass = "" if self.pass_name is None else f", pass_name={self.pass_name!r}"
        return (f"Directions(layers={self.layers}, positions={self.positions}, site={self.site!r}, step={self.step}"
                f"{in_pass}, n={self.n_positive}+{self.n_negative})")

    @classmethod
    def concat(cls, parts: "list[Directions]") -> "Directions":
        """Directions of several position kinds side by side (same prompts, layers, site and step), so
        that one `select_direction` sweep compares pre-instruction, post-instruction and pooled
        candidates together.

        Example:
            >>> both = Directions.concat([mean_difference(model, h, ok, positions=p) for p in ("pre_instruction", "mean_response")])
            >>> sel = select_direction(model, h, ok, h_val, ok_val, candidates=both)
        """
        parts = list(parts)
        if not parts or not all(isinstance(d, Directions) for d in parts):
            raise TypeError("Directions.concat takes a non-empty list of Directions.")
        first = parts[0]
        for d in parts[1:]:
            for attr in ("layers", "site", "step", "pass_name", "n_positive", "n_negative"):
                if getattr(d, attr) != getattr(first, attr):
                    raise ValueError(f"Cannot concatenate directions with different {attr}: {getattr(first, attr)!r} vs "
                                     f"{getattr(d, attr)!r}; compute them on the same prompts, layers, site and step.")
        labels = [pos for d in parts for pos in d.positions]
        repeated = sorted({str(p) for p in labels if labels.count(p) > 1})
        if repeated:
            raise ValueError(f"Position labels {repeated} appear in more than one part; concatenate different positions.")
        moments = [d.second_moment_positive for d in parts]
        if any(m is None for m in moments) and not all(m is None for m in moments):
            raise ValueError("Either every part or none must be computed with subspace=True.")
        return cls(
            torch.cat([d.mean_positive for d in parts], 1), torch.cat([d.mean_negative for d in parts], 1),
            list(first.layers), labels, first.site, first.step, first.n_positive, first.n_negative,
            None if moments[0] is None else torch.cat(moments, 1), first.pass_name,
        )

    def to_pandas(self):
        """One row per (layer, position): layer, position, norm of the raw difference, cosine of the class means.

        Example:
            >>> dirs.to_pandas().sort_values("norm", ascending=False).head()
        """
        pd = require_pandas("Directions.to_pandas()")
        norms, cosine = self.norms, self.cosine
        return pd.DataFrame([
            {"layer": layer, "position": pos, "norm": float(norms[i, j]), "cosine": float(cosine[i, j])}
            for i, layer in enumerate(self.layers) for j, pos in enumerate(self.positions)
        ])

    def _state(self) -> tuple[dict, dict]:
        tensors = {"mean_positive": self.mean_positive, "mean_negative": self.mean_negative}
        if self.second_moment_positive is not None:
            tensors["second_moment_positive"] = self.second_moment_positive
        meta = {"layers": list(self.layers), "positions": list(self.positions), "site": self.site, "step": self.step,
                "n_positive": self.n_positive, "n_negative": self.n_negative, "pass_name": self.pass_name}
        return tensors, meta

    @classmethod
    def _from_state(cls, tensors: dict, meta: dict) -> "Directions":
        return cls(tensors["mean_positive"], tensors["mean_negative"], second_moment_positive=tensors.get(
            "second_moment_positive"), **meta)

    def save(self, path) -> Path:
        """Write to the folder `path` (safetensors + JSON, no pickle; see `diffusion_lens.core.results_io`).

        Example:
            >>> dirs.save("runs/dirs")
            >>> dirs = Directions.load("runs/dirs")
        """
        return save_result(path, "Directions", *self._state())

    @classmethod
    def load(cls, path) -> "Directions":
        """Read directions written by `Directions.save` (tensors on the CPU).

        Example:
            >>> r = Directions.load("runs/dirs").unit(6, "post_instruction[-1]")
        """
        return cls._from_state(*load_result(path, "Directions"))


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


class _Plan:
    """Streaming reducers (`diffusion_lens.denoising.StreamingMean`) for one `Positions`.

    Named offsets and post-instruction tokens are the same columns in every row and batch when
    counted from the end of the canvas (the response length is fixed), so one per-position reducer
    reads them all; pre-instruction tokens sit after each row's left padding, so each of them gets
    a pooled reducer over a per-row scope; pooled names use the state scopes "prompt" / "response"
    / "all" (token-weighted means; pads never count).
    """

    def __init__(self, sites, positions: Positions, template, response_length: int, reading: Reading,
                 second_moment: bool):
        self.sites, self.positions, self.template, self.reading = list(sites), positions, template, reading
        kind = positions.kind
        read = dict(steps=reading.step, passes=reading.pass_name)
        if kind in POOLED:
            self.reducers = [StreamingMean(self.sites, positions=_POOLED_SCOPES[kind], **read)]
            self.mode = "pooled"
        elif kind == "pre_instruction":
            n_pre = len(template.prefix)
            self.reducers = [StreamingMean(self.sites, positions=_pre_scope(i), **read) for i in range(n_pre)]
            self.mode = "pre"
        else:
            offsets = list(range(-len(template.suffix), 0)) if kind == "post_instruction" else list(positions.offsets)
            self.columns = [o - response_length for o in offsets]  # negative: counted from the canvas end
            self.reducers = [StreamingMean(self.sites, positions=self.columns, per_position=True, **read)]
            self.mode = "columns"
        self.moments = _SecondMoments(self) if second_moment else None

    def hooks(self, indices) -> list:
        """The hooks of one batch (prompts `indices`): the check that the forward read computes every
        selected position (`selector` raises naming the columns it computes), and the second moments."""
        def check(act, hook):
            selector(self.positions, hook.state, self.template, indices)

        checks = [H.at(self.sites[0], check, steps=self.reading.step, passes=self.reading.pass_name)]
        return checks + ([] if self.moments is None else self.moments.hooks())

    def reduce_across_ranks(self) -> None:
        """Add every rank's float64 sums and counts (`all_reduce_float64`), so each rank holds the sums
        of all batches: the one-process means up to float64 round-off. A no-op in one process.

        The running sums are `StreamingMean.running_sums` and `_SecondMoments.sums`; a rank that ran
        no batch contributes zeros."""
        if world()[1] == 1:
            return
        for reducer in self.reducers:
            for site in self.sites:
                local, count = reducer.running_sums(site)
                total = all_reduce_float64(local)
                if total is None:
                    continue
                as_tensor = torch.as_tensor(count if count is not None else 0, dtype=torch.float64)
                if count is None and self.mode == "columns":
                    as_tensor = None  # per-column counts: the shape comes from the ranks that ran a batch
                summed = all_reduce_float64(as_tensor).round().long()
                reducer.set_running_sums(site, total, summed if self.mode == "columns" else int(summed))
        if self.moments is not None:
            for site in self.sites:
                total = all_reduce_float64(self.moments.sums.get(site))
                if total is not None:
                    self.moments.sums[site] = total
                    n = all_reduce_float64(torch.tensor(float(self.moments.counts.get(site, 0)), dtype=torch.float64))
                    self.moments.counts[site] = int(n.round())

    def means(self) -> Float[Tensor, "site pos d"]:
        if self.mode == "pooled":
            return torch.stack([self.reducers[0].mean(site)[None] for site in self.sites])
        if self.mode == "pre":
            return torch.stack([torch.stack([r.mean(site) for r in self.reducers]) for site in self.sites])
        return torch.stack([self.reducers[0].mean(site) for site in self.sites])

    def selected(self, act: Tensor, state) -> Tensor:
        """[batch n_sel d] (or [k 1 d] pooled tokens) of one activation (the columns its forward
        computed, `state.computed`), for the second moments."""
        act, start = act[: state.batch], state.computed.start
        if self.mode == "columns":
            return act[:, [c % state.n_pos - start for c in self.columns]]
        if self.mode == "pre":
            index = _n_pad(state)[:, None] + torch.arange(len(self.reducers), device=act.device)[None, :] - start
            return act.gather(1, index[..., None].expand(-1, -1, act.shape[-1]))
        valid = H.position_mask(state, _POOLED_SCOPES[self.positions.kind]) & ~state.is_pad
        return act[valid[:, state.computed]][:, None]


_POOLED_SCOPES = {"mean_prompt": "prompt", "mean_response": "response", "mean_all": "all"}


class _SecondMoments:
    """Streaming float64 E[x x^T] per site and selected position (for `Directions.subspace`)."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def hooks(self) -> list:
        def update(act, hook):
            x = self.plan.selected(act, hook.state).double()
            outer = torch.einsum("bpd,bpe->pde", x, x)
            self.sums[hook.name] = outer if hook.name not in self.sums else self.sums[hook.name] + outer
            self.counts[hook.name] = self.counts.get(hook.name, 0) + x.shape[0]

        reading = self.plan.reading
        return [H.at(site, update, steps=reading.step, passes=reading.pass_name) for site in self.plan.sites]

    def means(self) -> Tensor:
        return torch.stack([self.sums[s] / self.counts[s] for s in self.plan.sites])


def _n_pad(state) -> Tensor:
    return state.is_pad.sum(1)


def _pre_scope(i: int):
    def scope(state):
        mask = torch.zeros_like(state.canvas, dtype=torch.bool)
        mask[torch.arange(state.batch, device=mask.device), _n_pad(state) + i] = True
        return mask

    scope.__name__ = f"pre_instruction[{i}]"
    return scope


def _check_prompts_against_positions(prepared, positions: Positions, response_length: int, argument: str) -> None:
    """Template tokens present in every prompt; named offsets inside every canvas."""
    kind = positions.kind
    if kind in ("pre_instruction", "post_instruction"):
        part = positions.template_tokens(prepared.template)
        ref = torch.tensor(part)
        bad = []
        for i, t in enumerate(prepared.tokens):
            piece = t[: len(part)] if kind == "pre_instruction" else t[t.numel() - len(part):]
            if t.numel() < len(part) or not torch.equal(piece.cpu(), ref):
                bad.append(i)
        if bad:
            raise ValueError(
                f"{argument} prompts {bad[:10]} do not {'start' if kind == 'pre_instruction' else 'end'} with the chat "
                f"template's {kind} tokens {part}; name explicit positions for them."
            )
    elif kind == "offsets":
        shortest = min(t.numel() for t in prepared.tokens)
        bad = [label for o, label in zip(positions.offsets, positions.labels) if not -shortest <= o < response_length]
        if bad:
            raise ValueError(
                f"positions {bad} reach outside a canvas: the shortest {argument} prompt has {shortest} tokens "
                f"(prompt[-{shortest}] at most), the response {response_length} positions "
                f"(response[{response_length - 1}] at most)."
            )


def _class_means(model, prepared, sites, positions, *, reading, batch_size, second_moment, argument, bar):
    response_length = reading.sampler.response_length()
    _check_prompts_against_positions(prepared, positions, response_length, argument)
    plan = _Plan(sites, positions, prepared.template, response_length, reading, second_moment)
    for _, indices in my_batches(batch_indices(model, prepared, batch_size)):
        bar.update()
        tokens, mask, _ = left_pad(model, [prepared.tokens[i] for i in indices])
        reading.generate(model, tokens, mask, reading.hooks(model, sites) + plan.hooks(indices), plan.reducers)
    plan.reduce_across_ranks()
    return plan.means(), (None if plan.moments is None else plan.moments.means())


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
    generate_kwargs: Optional[dict] = None,
    column: Optional[str] = None,
    progress: bool = True,
    pass_name: Optional[str] = None,
) -> Directions:
    """Difference of class means of `site` activations per layer and position (float64, streaming).

    One forward per prompt (batches of `batch_size`) through `generate`, accumulated by
    `diffusion_lens.denoising.StreamingMean` (float64 running sums: memory independent of the
    number of prompts). `step=0` reads the canvas every sampler starts from (prompt +
    `gen_length` masks, `CanvasProbe`; no sampler options needed); `step=s > 0` runs the model's
    sampler with `generate_kwargs` (its options, e.g. steps / gen_length / block_length, and seed)
    up to step s and reads that step's forward (the response length is then the sampler's).

    Multi-pass models (`cfg.layer_scalar_passes`, DiffusionGemma) run the family's sampler, and
    `pass_name` picks the forward: "encoder" reads the causal pass over the prompt (prompt positions;
    None reads step `step` whatever its pass, at step 0 the encoder), "decoder" the first denoising
    step over a noise canvas drawn from `generate_kwargs`' `seed` (default 0; one canvas for every
    prompt) that reads the prompt's KV cache (canvas positions "response[i]", "mean_response").
    With `step=s > 0` the pass must be the one step s runs. A position the forward does not
    compute is an error naming the columns it computes.

    `positions` (`diffusion_lens.steering.positions`): "last_prompt", "prompt[-k]", "response[i]"
    or a list of those; "pre_instruction" / "post_instruction" (chat-template tokens around the
    user text; string prompts only); pooled "mean_prompt" / "mean_response" / "mean_all"
    (token-weighted means over those positions of all prompts of a class; pads excluded).
    `subspace=True` also streams the positive class's second moment (d_model^2 floats per layer
    and position) for `Directions.subspace`. `positive` / `negative` may be `datasets.Dataset`s:
    their prompt column is detected (prompt, instruction, goal, ...) or named with `column=`.
    `progress=False` turns off the bar over batches. Inside a `torch.distributed` process group
    (torchrun, accelerate launch) each rank runs every world-size-th batch and the float64 sums are
    added across ranks: every rank returns the same `Directions`, the one-process result up to
    float64 round-off (`diffusion_lens.prompts.distributed`; docs/data_parallel.md).

    Example:
        >>> dirs = mean_difference(model, harmful, harmless, layers="all", positions="post_instruction")
        >>> dirs.cosine[:, -1]                           # cosine of class means per layer
        >>> r = dirs.unit(layer=14, pos="post_instruction[-1]")
        >>> canvas = mean_difference(gemma, harmful, harmless, positions="mean_response", pass_name="decoder")
    """
    positions = parse_positions(positions)
    if not isinstance(site, str) or not site.startswith("hook_"):
        raise ValueError(f"site must be a block hook name such as 'hook_resid_pre'; got {site!r}.")
    layer_list = resolve_layers(model, layers)
    sites = [f"blocks.{layer}.{site}" for layer in layer_list]
    model.check_hook_names(sites)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0; got {step!r}.")
    check_batch_size(batch_size)
    pos_prompts = prepare_prompts(model, positive, chat=chat, argument="positive", column=column)
    neg_prompts = prepare_prompts(model, negative, chat=chat, argument="negative", column=column)
    for prepared in (pos_prompts, neg_prompts):
        check_positions(positions, prepared)
    options = dict(generate_kwargs or {})
    for reserved in ("reducers", "stop_after", "return_trajectory", "attention_mask"):
        if reserved in options:
            raise ValueError(f"generate_kwargs may not set {reserved!r}; mean_difference controls it.")
    reading = Reading.plan(model, pass_name=pass_name, step=step, gen_length=gen_length, generate_kwargs=options)
    n_batches = sum(len(my_batches(batch_indices(model, p, batch_size))) for p in (pos_prompts, neg_prompts))
    with progress_bar(n_batches, "mean_difference", progress) as bar:
        common = dict(reading=reading, batch_size=batch_size, bar=bar)
        mp, sp = _class_means(model, pos_prompts, sites, positions, second_moment=subspace, argument="positive", **common)
        mn, _ = _class_means(model, neg_prompts, sites, positions, second_moment=False, argument="negative", **common)
    labels = positions.position_labels(pos_prompts.template or neg_prompts.template)
    return Directions(
        mean_positive=mp, mean_negative=mn, layers=layer_list, positions=labels, site=site, step=step,
        n_positive=len(pos_prompts), n_negative=len(neg_prompts), second_moment_positive=sp, pass_name=pass_name,
    )


@dataclass
class PCAResult:
    """PCA of two classes' activations at one site: `components` [k d] (rows), their explained
    variance ratio [k], and each class's coordinates [n k] (centred on the pooled mean).

    Example:
        >>> res = class_pca(model, harmful, harmless, layer=10, position="last_prompt")
        >>> res.positive[:, 0].mean() - res.negative[:, 0].mean()   # separation along PC1
    """

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
    position: PositionSpec = "last_prompt",
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
        >>> res = class_pca(model, harmful, harmless, layer=10, position="last_prompt")
        >>> fig = diffusion_lens.plot.pca_scatter(res)
        >>> res.explained_variance_ratio
    """
    parsed = parse_positions(position, argument="position")
    if parsed.kind not in POOLED and not (parsed.kind == "offsets" and len(parsed.offsets) == 1):
        raise ValueError(f"class_pca needs one position ('last_prompt', 'prompt[-k]', 'response[i]' or a pooled name); "
                         f"got {position!r}.")
    (layer,) = resolve_layers(model, [layer], argument="layer")
    name = f"blocks.{layer}.{site}"
    acts = []
    for prompts, argument in ((positive, "positive"), (negative, "negative")):
        x = collect_activations(model, prompts, sites=[name], pooling=parsed, gen_length=gen_length,
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
