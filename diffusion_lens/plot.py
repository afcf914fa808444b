"""Plots for steering analyses (matplotlib). Every function returns a `matplotlib.figure.Figure`
built without pyplot, so nothing is shown and no global figure state is touched; save it with
`fig.savefig(path)` or display it in a notebook by leaving it as a cell's value.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def _figure(figsize=(6.0, 4.0)):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("diffusion_lens.plot needs matplotlib: pip install matplotlib") from error
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _as_grid(values: Any, name: str) -> Tensor:
    grid = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if grid.ndim != 2:
        raise ValueError(f"{name} must be a 2-D grid; got shape {tuple(grid.shape)}.")
    return grid


def _heatmap(ax, grid: Tensor, x_labels, y_labels, cmap: str, colorbar_label: str, annotate: bool):
    image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, origin="lower", interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), [str(x) for x in x_labels], rotation=45 if grid.shape[1] > 6 else 0, ha="right" if grid.shape[1] > 6 else "center")
    ax.set_yticks(range(grid.shape[0]), [str(y) for y in y_labels])
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    if annotate and grid.numel() <= 400:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                value = float(grid[i, j])
                if value == value:
                    ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7)
    return image


def cosine_per_layer(directions, *, show_norms: bool = True, title: Optional[str] = None):
    """Cosine between the two class means per layer (one line per position), with the
    mean-difference norm on a second axis.

    Example:
        >>> dirs = mean_difference(model, harmful, harmless, positions="post_instruction")
        >>> fig = cosine_per_layer(dirs)
        >>> fig.savefig("cosine.png")
    """
    fig, ax = _figure()
    layers = list(directions.layers)
    cos, norms = directions.cosine.cpu(), directions.norms.cpu()
    for j, pos in enumerate(directions.positions):
        ax.plot(layers, cos[:, j].numpy(), marker="o", label=f"cos, pos {pos}")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(mean positive, mean negative)")
    if show_norms:
        twin = ax.twinx()
        for j, pos in enumerate(directions.positions):
            twin.plot(layers, norms[:, j].numpy(), linestyle="--", alpha=0.6, label=f"|diff|, pos {pos}")
        twin.set_ylabel("|mean difference|")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"Class means at {directions.site} (step {directions.step})")
    return fig


def pca_scatter(result, *, labels: Sequence[str] = ("positive", "negative"), title: Optional[str] = None):
    """Scatter of both classes on the first two principal components of a `class_pca` result.

    Example:
        >>> res = class_pca(model, harmful, harmless, layer=10, position="last_prompt")
        >>> fig = pca_scatter(res, labels=("harmful", "harmless"))
        >>> fig.savefig("pca.png")
    """
    fig, ax = _figure((5.0, 4.5))
    k = result.positive.shape[1]
    for coords, label, marker in ((result.positive, labels[0], "o"), (result.negative, labels[1], "x")):
        xy = coords.cpu().numpy()
        ax.scatter(xy[:, 0], xy[:, 1] if k > 1 else [0.0] * len(xy), label=label, marker=marker, alpha=0.7)
    ratio = result.explained_variance_ratio.cpu().tolist()
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}%)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}%)" if k > 1 else "")
    ax.legend()
    ax.set_title(title or f"PCA at layer {result.layer}, position {result.position}")
    return fig


def sensitivity_heatmap(sensitivity, *, title: Optional[str] = None, cmap: str = "viridis", annotate: bool = True):
    """Layer x step-window heatmap of a metric (e.g. refusal rate) under windowed ablation.

    Accepts a `Sensitivity` result (from `diffusion_lens.steering.sensitivity`) or a dict with
    `values` [rows cols], `row_labels`, `col_labels` (and optional `row_name`, `col_name`).

    Example:
        >>> sens = sensitivity(model, r, harmful, over=("layers", "steps"), metric=rate)
        >>> fig = sensitivity_heatmap(sens)
        >>> fig.savefig("sensitivity.png")
    """
    data = sensitivity if isinstance(sensitivity, dict) else sensitivity.as_grid()
    grid = _as_grid(data["values"], "values")
    fig, ax = _figure((max(4.0, 0.5 * grid.shape[1] + 2.5), max(3.0, 0.35 * grid.shape[0] + 1.5)))
    _heatmap(ax, grid, data["col_labels"], data["row_labels"], cmap, data.get("metric_name", "metric"), annotate)
    ax.set_xlabel(data.get("col_name", "steps"))
    ax.set_ylabel(data.get("row_name", "layer"))
    ax.set_title(title or "Sensitivity to ablation")
    return fig


def selection_heatmap(selection, score: str = "bypass", *, title: Optional[str] = None, annotate: bool = True):
    """Heatmap of a `select_direction` score over (layer, position); filtered-out candidates are
    greyed with an 'x' and the winner is boxed.

    Example:
        >>> sel = select_direction(model, harm_tr, ok_tr, harm_val, ok_val)
        >>> fig = selection_heatmap(sel, "bypass")
        >>> fig.savefig("selection.png")
    """
    if score not in ("bypass", "induce", "kl"):
        raise ValueError(f"score must be 'bypass', 'induce' or 'kl'; got {score!r}.")
    grid = _as_grid(getattr(selection, score), score)
    dirs = selection.directions
    fig, ax = _figure((max(4.0, 0.6 * grid.shape[1] + 2.5), max(3.0, 0.3 * grid.shape[0] + 1.5)))
    cmap = "RdBu_r" if score != "kl" else "magma"
    _heatmap(ax, grid, dirs.positions, dirs.layers, cmap, score, annotate)
    kept = selection.kept.cpu()
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not bool(kept[i, j]):
                ax.scatter([j], [i], marker="x", color="grey", s=30)
    if selection.winner is not None:
        from matplotlib.patches import Rectangle

        i = dirs.layers.index(selection.winner["layer"])
        j = dirs.positions.index(selection.winner["position"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Direction selection: {score} score (x = filtered out)")
    return fig


__all__ = ["cosine_per_layer", "pca_scatter", "selection_heatmap", "sensitivity_heatmap"]
