"""Plots for steering analyses. The matplotlib functions return a `matplotlib.figure.Figure` built
without pyplot, so nothing is shown and no global figure state is touched; save it with
`fig.savefig(path)` or display it in a notebook by leaving it as a cell's value. The `*_plotly`
twins of the heatmaps return an interactive `plotly.graph_objects.Figure` (hover shows each cell's
value) for HTML reports: `fig.to_html(include_plotlyjs=True)` embeds plotly.js, so the page works offline.
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


# Long position names shortened on tick labels ("post_instruction[-2]" -> "post[-2]"); hover text keeps the full name.
_SHORT = (("pre_instruction", "pre"), ("post_instruction", "post"), ("mean_response", "mean resp"),
          ("mean_prompt", "mean prompt"), ("last_prompt", "last"), ("response", "resp"))


def short_label(label: Any) -> str:
    """A tick label short enough not to overlap its neighbours.

    Example:
        >>> short_label("post_instruction[-2]"), short_label("steps 0-7")
        ('post[-2]', 'steps 0-7')
    """
    text = str(label)
    for long, short in _SHORT:
        if text.startswith(long):
            return short + text[len(long):]
    return text


def _heatmap(ax, grid: Tensor, x_labels, y_labels, cmap: str, colorbar_label: str, annotate: bool,
             value_range: Optional[tuple[float, float]] = None):
    low, high = value_range or (None, None)
    image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, origin="lower", interpolation="nearest", vmin=low, vmax=high)
    x_text = [short_label(x) for x in x_labels]
    rotate = grid.shape[1] > 6 or max(map(len, x_text), default=0) > 6
    ax.set_xticks(range(grid.shape[1]), x_text, rotation=60 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor" if rotate else "default", fontsize=8 if grid.shape[1] > 12 else 9)
    ax.set_yticks(range(grid.shape[0]), [str(y) for y in y_labels])
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    if annotate and grid.numel() <= 400:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                value = float(grid[i, j])
                if value == value:  # white on dark cells, black on light ones
                    red, green, blue, _ = image.cmap(image.norm(value))
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
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


def sensitivity_heatmap(sensitivity, *, title: Optional[str] = None, cmap: str = "viridis", annotate: bool = True,
                        value_range: Optional[tuple[float, float]] = None):
    """Layer x step-window heatmap of a metric (e.g. refusal rate) under windowed ablation.

    Accepts a `Sensitivity` result (from `diffusion_lens.steering.sensitivity`) or a dict with
    `values` [rows cols], `row_labels`, `col_labels` (and optional `row_name`, `col_name`).
    `value_range` (low, high) fixes the colour scale, e.g. (0, 1) to compare grids of rates.

    Example:
        >>> sens = sensitivity(model, r, harmful, over=("layers", "steps"), metric=rate)
        >>> fig = sensitivity_heatmap(sens)
        >>> fig.savefig("sensitivity.png")
    """
    data = sensitivity if isinstance(sensitivity, dict) else sensitivity.as_grid()
    grid = _as_grid(data["values"], "values")
    fig, ax = _figure((max(4.0, 0.5 * grid.shape[1] + 2.5), max(3.0, 0.35 * grid.shape[0] + 1.5)))
    _heatmap(ax, grid, data["col_labels"], data["row_labels"], cmap, data.get("metric_name", "metric"), annotate,
             value_range)
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
            if not bool(kept[i, j]):  # in the cell's corner, clear of its value
                ax.scatter([j + 0.32], [i + 0.28], marker="x", color="dimgrey", s=14, linewidths=1)
    if selection.winner is not None:
        from matplotlib.patches import Rectangle

        i = dirs.layers.index(selection.winner["layer"])
        j = dirs.positions.index(selection.winner["position"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Direction selection: {score} score (x = filtered out)")
    return fig


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as error:  # pragma: no cover - plotly is a dependency
        raise ImportError("the *_plotly figures need plotly: pip install 'plotly>=5'") from error
    return go


def _plotly_heatmap(grid: Tensor, x_labels, y_labels, *, colorscale: str, colorbar: str, title: str,
                    x_title: str, y_title: str, hover: list, value_range: Optional[tuple[float, float]] = None):
    """One plotly heatmap: short tick labels (rotated when many), full names and values on hover."""
    go = _plotly()
    values = [[None if v != v else v for v in row] for row in grid.tolist()]  # NaN -> gap
    x_text = [short_label(x) for x in x_labels]
    fig = go.Figure(go.Heatmap(
        z=values, x=list(range(grid.shape[1])), y=list(range(grid.shape[0])), colorscale=colorscale,
        zmin=value_range[0] if value_range else None, zmax=value_range[1] if value_range else None,
        colorbar={"title": {"text": colorbar}}, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
        text=[["" if v is None else f"{v:.2g}" for v in row] for row in values],
        texttemplate="%{text}" if grid.numel() <= 200 else None, textfont={"size": 10},
    ))
    many = grid.shape[1] > 6 or max(map(len, x_text), default=0) > 6
    fig.update_layout(
        title={"text": title.replace("\n", "<br>"), "font": {"size": 15}}, template="plotly_white",
        width=max(480, 46 * grid.shape[1] + 260), height=max(320, 34 * grid.shape[0] + 190),
        margin={"l": 70, "r": 30, "t": 60 + 20 * title.count("\n"), "b": 110 if many else 60},
        xaxis={"title": {"text": x_title}, "tickmode": "array", "tickvals": list(range(grid.shape[1])),
               "ticktext": x_text, "tickangle": -60 if many else 0, "tickfont": {"size": 10},
               "range": [-0.5, grid.shape[1] - 0.5], "showgrid": False, "zeroline": False},
        yaxis={"title": {"text": y_title}, "tickmode": "array", "tickvals": list(range(grid.shape[0])),
               "ticktext": [str(y) for y in y_labels], "range": [-0.5, grid.shape[0] - 0.5], "showgrid": False,
               "zeroline": False},
    )
    return fig


def selection_heatmap_plotly(selection, score: str = "bypass", *, title: Optional[str] = None):
    """Interactive twin of `selection_heatmap`: a `select_direction` score over (layer, position),
    filtered-out candidates marked 'x', the winner boxed, every cell's full position, scores and
    verdict on hover.

    Example:
        >>> sel = select_direction(model, harm_tr, ok_tr, harm_val, ok_val)
        >>> selection_heatmap_plotly(sel).write_html("selection.html", include_plotlyjs=True)
    """
    if score not in ("bypass", "induce", "kl"):
        raise ValueError(f"score must be 'bypass', 'induce' or 'kl'; got {score!r}.")
    grid = _as_grid(getattr(selection, score), score)
    dirs = selection.directions
    kept = selection.kept.cpu()
    scores = {name: _as_grid(getattr(selection, name), name) for name in ("bypass", "induce", "kl")}
    hover = [[f"layer {layer}, {position}<br>" + "<br>".join(f"{name} {float(scores[name][i, j]):.3f}" for name in scores)
              + ("<br>kept" if bool(kept[i, j]) else "<br>filtered out")
              for j, position in enumerate(dirs.positions)] for i, layer in enumerate(dirs.layers)]
    fig = _plotly_heatmap(grid, dirs.positions, dirs.layers, colorscale="RdBu_r" if score != "kl" else "Magma",
                          colorbar=score, title=title or f"Direction selection: {score} score (x = filtered out)",
                          x_title="position", y_title="layer", hover=hover)
    go = _plotly()
    filtered = [(j, i) for i in range(grid.shape[0]) for j in range(grid.shape[1]) if not bool(kept[i, j])]
    if filtered:
        fig.add_trace(go.Scatter(x=[j + 0.32 for j, _ in filtered], y=[i + 0.28 for _, i in filtered], mode="markers",
                                 marker={"symbol": "x-thin", "size": 7, "line": {"width": 1.5, "color": "dimgrey"}},
                                 hoverinfo="skip", showlegend=False))
    if selection.winner is not None:
        i = dirs.layers.index(selection.winner["layer"])
        j = dirs.positions.index(selection.winner["position"])
        fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, line={"color": "black", "width": 3})
    return fig


def sensitivity_heatmap_plotly(sensitivity, *, title: Optional[str] = None, colorscale: str = "Viridis",
                               value_range: Optional[tuple[float, float]] = None):
    """Interactive twin of `sensitivity_heatmap`: a layer x step-window grid of a metric under
    windowed ablation (a `Sensitivity` or the same dict), values on the cells and on hover;
    `value_range` (low, high) fixes the colour scale.

    Example:
        >>> sens = sensitivity(model, r, harmful, over=("layers", "steps"), window=8)
        >>> sensitivity_heatmap_plotly(sens).write_html("sensitivity.html", include_plotlyjs=True)
    """
    data = sensitivity if isinstance(sensitivity, dict) else sensitivity.as_grid()
    grid = _as_grid(data["values"], "values")
    row_name, col_name = data.get("row_name", "layer"), data.get("col_name", "steps")
    metric = data.get("metric_name", "metric")
    hover = [[f"{row_name} {row}, {col_name} {col}<br>{metric} {float(grid[i, j]):.3f}"
              for j, col in enumerate(data["col_labels"])] for i, row in enumerate(data["row_labels"])]
    return _plotly_heatmap(grid, data["col_labels"], data["row_labels"], colorscale=colorscale, colorbar=metric,
                           title=title or "Sensitivity to ablation", x_title=col_name, y_title=row_name, hover=hover,
                           value_range=value_range)


def _pareto_points(trials: Sequence[dict]):
    if not trials:
        raise ValueError("No completed trial to plot; run the search first.")
    return ([t["diffusion_kl"] for t in trials], [t["refusal"] for t in trials])


def pareto_scatter(trials: Sequence[dict], front: Sequence[int], *, title: Optional[str] = None):
    """Refusal rate against diffusion KL, one point per abliteration trial (rows of
    `SearchResult.row`), the Pareto front (trial numbers `front`) joined and highlighted.

    Example:
        >>> fig = pareto_scatter([result.row(t) for t in result.trials()], [r["trial"] for r in result.front()])
    """
    kl, refusal = _pareto_points(trials)
    fig, ax = _figure((6.0, 4.0))
    ax.scatter(kl, refusal, s=18, color="#9aa5b1", label="trial")
    best = sorted((t for t in trials if t["trial"] in set(front)), key=lambda t: t["diffusion_kl"])
    ax.plot([t["diffusion_kl"] for t in best], [t["refusal"] for t in best], "o-", color="#d1495b", label="Pareto front")
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.set_xlabel("diffusion KL on harmless prompts (nats)")
    ax.set_ylabel("refusal rate on harmful prompts")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"abliteration search: {len(trials)} trials")
    return fig


def pareto_plotly(trials: Sequence[dict], front: Sequence[int], *, title: Optional[str] = None):
    """Interactive twin of `pareto_scatter`: hover shows each trial's number, objectives, the
    first-position (proxy) KL and its parameters.

    Example:
        >>> pareto_plotly(rows, front).write_html("pareto.html", include_plotlyjs=True)
    """
    go = _plotly()
    kl, refusal = _pareto_points(trials)

    def hover(t):
        params = "<br>".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in t["params"].items())
        return (f"trial {t['trial']}<br>refusal {t['refusal']:.3f}<br>diffusion KL {t['diffusion_kl']:.4f}<br>"
                f"first-position KL {t['first_position_kl']:.4f}<br>{params}")

    best = sorted((t for t in trials if t["trial"] in set(front)), key=lambda t: t["diffusion_kl"])
    fig = go.Figure([
        go.Scatter(x=kl, y=refusal, mode="markers", name="trial", marker={"color": "#9aa5b1", "size": 7},
                   customdata=[hover(t) for t in trials], hovertemplate="%{customdata}<extra></extra>"),
        go.Scatter(x=[t["diffusion_kl"] for t in best], y=[t["refusal"] for t in best], mode="lines+markers",
                   name="Pareto front", marker={"color": "#d1495b", "size": 9},
                   customdata=[hover(t) for t in best], hovertemplate="%{customdata}<extra></extra>"),
    ])
    fig.update_layout(title={"text": title or f"abliteration search: {len(trials)} trials"}, template="plotly_white",
                      xaxis={"title": {"text": "diffusion KL on harmless prompts (nats)"}},
                      yaxis={"title": {"text": "refusal rate on harmful prompts"}, "range": [-0.05, 1.05]},
                      width=720, height=460)
    return fig


def radar_chart(scores: dict[str, dict[str, float]], *, title: Optional[str] = None):
    """One closed polygon per series over shared axes with values in [0, 1], e.g. IFEval accuracy per
    constraint for each steering method (the optimal-transport paper's figure). Needs >= 3 axes.

    Example:
        >>> fig = radar_chart({"Linear-ACT": {"a": 0.9, "b": 0.5, "c": 0.7}, "no steering": {"a": 0.6, "b": 0.4, "c": 0.7}})
    """
    import math

    if not scores:
        raise ValueError("radar_chart needs at least one series.")
    axes = list(next(iter(scores.values())))
    if len(axes) < 3:
        raise ValueError(f"radar_chart needs >= 3 axes; got {axes}. Plot fewer categories as bars instead.")
    differ = {name: sorted(values) for name, values in scores.items() if set(values) != set(axes)}
    if differ:
        raise ValueError(f"Every series must have the axes {sorted(axes)}; these differ: {differ}.")
    fig, _ = _figure((6.0, 5.0))
    fig.clear()
    ax = fig.add_subplot(1, 1, 1, projection="polar")
    angles = [2 * math.pi * i / len(axes) for i in range(len(axes))]
    for name, values in scores.items():
        ys = [float(values[a]) for a in axes]
        ax.plot(angles + angles[:1], ys + ys[:1], "o-", linewidth=1.5, markersize=3, label=name)
        ax.fill(angles + angles[:1], ys + ys[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([short_label(a).split(":")[-1] for a in axes], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    ax.set_title(title or "accuracy per category", fontsize=10)
    return fig


__all__ = ["cosine_per_layer", "pareto_plotly", "pareto_scatter", "pca_scatter", "radar_chart", "selection_heatmap",
           "selection_heatmap_plotly", "sensitivity_heatmap", "sensitivity_heatmap_plotly", "short_label"]
