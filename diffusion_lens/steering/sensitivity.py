"""Where does a direction act? Ablate it at one layer / one step window / one block at a time.

`sensitivity` generates the prompts once per cell of a grid -- rows are layers (or "all"),
columns are denoising step windows or semi-autoregressive blocks (or "all") -- with
`ablate(model, direction, layers=..., steps=... / denoise_blocks=...)`, and measures a metric of the
outputs (by default the refusal rate of the decoded responses). Scheduling is done by
`diffusion_lens.denoising.hooks.at` through `ablate`'s `steps=` / `denoise_blocks=` arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.results_io import load_result, save_result
from diffusion_lens.denoising.generate import split_generate_kwargs
from diffusion_lens.evals.refusal import is_refusal
from diffusion_lens.prompts.batching import PromptsInput, batch_indices, check_batch_size, left_pad, prepare_prompts
from diffusion_lens.prompts.distributed import check_batch_draws, gather_records, my_batches
from diffusion_lens.steering._common import LayerSpec, check_vector, progress_bar, require_pandas, resolve_layers
from diffusion_lens.steering.interventions import ablate

Metric = Callable[..., Union[float, Tensor]]
AXES = ("layers", "steps", "blocks")


@dataclass
class Sensitivity:
    """Metric grid under windowed ablation: `values` [rows cols] with row / column labels, plus the
    metric with no ablation (`baseline`) and with ablation everywhere (`full`).

    Example:
        >>> sens = sensitivity(model, r, harmful, over=("layers", "steps"), generate_kwargs=opts)
        >>> sens.values.shape, sens.baseline, sens.full
        >>> diffusion_lens.plot.sensitivity_heatmap(sens)
    """

    values: Float[Tensor, "rows cols"]
    row_labels: list
    col_labels: list
    row_name: str
    col_name: str
    baseline: float
    full: float
    metric_name: str = "metric"
    extra: dict = field(default_factory=dict)

    def as_grid(self) -> dict:
        """The dict `diffusion_lens.plot.sensitivity_heatmap` reads.

        Example:
            >>> grid = sens.as_grid()
            >>> grid["values"].shape, grid["row_labels"], grid["col_labels"]
        """
        return {"values": self.values, "row_labels": self.row_labels, "col_labels": self.col_labels,
                "row_name": self.row_name, "col_name": self.col_name, "metric_name": self.metric_name}

    def to_pandas(self):
        """The grid as a DataFrame: index = row labels, columns = column labels (`.stack()` for long form).

        Example:
            >>> sens.to_pandas().round(2)
        """
        pd = require_pandas("Sensitivity.to_pandas()")
        return pd.DataFrame(self.values.tolist(), index=pd.Index(self.row_labels, name=self.row_name),
                            columns=pd.Index(self.col_labels, name=self.col_name))

    def save(self, path) -> Path:
        """Write to the folder `path` (safetensors + JSON, no pickle; see `diffusion_lens.core.results_io`).

        Example:
            >>> sens.save("runs/sensitivity")
            >>> Sensitivity.load("runs/sensitivity").values
        """
        meta = {"row_labels": self.row_labels, "col_labels": self.col_labels, "row_name": self.row_name,
                "col_name": self.col_name, "baseline": self.baseline, "full": self.full,
                "metric_name": self.metric_name, "extra": self.extra}
        return save_result(path, "Sensitivity", {"values": self.values}, meta)

    @classmethod
    def load(cls, path) -> "Sensitivity":
        """Read a grid written by `Sensitivity.save`.

        Example:
            >>> fig = diffusion_lens.plot.sensitivity_heatmap(Sensitivity.load("runs/sensitivity"))
        """
        tensors, meta = load_result(path, "Sensitivity")
        return cls(values=tensors["values"], **meta)


def _default_metric(out) -> Tensor:
    if out.texts is None:
        raise ValueError("The default metric (refusal rate) needs decoded texts; the model has no tokenizer. "
                         "Pass metric=fn(output) -> per-prompt values.")
    return torch.tensor([float(is_refusal(t)) for t in out.texts], dtype=torch.float64)


def _windows(n: int, window: Optional[int], what: str) -> list[range]:
    if window is None:
        window = max(1, -(-n // 8))  # at most 8 windows by default
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{what} window must be a positive int; got {window!r}.")
    return [range(start, min(start + window, n)) for start in range(0, n, window)]


def _label(r: range) -> str:
    return str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def sensitivity(
    model,
    direction: Float[Tensor, " d_model"],
    prompts: PromptsInput,
    *,
    over: Union[str, Sequence[str]] = ("layers", "steps"),
    metric: Optional[Metric] = None,
    layers: LayerSpec = "all",
    window: Optional[int] = None,
    batch_size: int = 16,
    chat: Optional[bool] = None,
    generate_kwargs: Optional[dict] = None,
    progress: bool = True,
) -> Sensitivity:
    """Ablate `direction` at one layer and/or one step window (or block) at a time; measure `metric`.

    `over`: "layers" (rows = each layer, all steps), "steps" (one row "all layers", columns = step
    windows of `window` steps, at most 8 windows by default), "blocks" (columns = semi-AR blocks),
    or a pair ("layers", "steps") / ("layers", "blocks") for a layer x time grid. `metric(out)`
    takes a `GenerationOutput` of one batch and returns per-prompt values [batch] (or a float for
    the batch); the default is the refusal indicator of the decoded text, so values are refusal
    rates. `generate_kwargs` go to `model.generate` (sampler options, seed...); the same seed is
    used for every cell. `progress=False` turns off the bar over cells.

    Inside a `torch.distributed` process group (torchrun, accelerate launch) the (cell, batch) runs
    are shared round-robin over the ranks, with the batches of one process; the per-batch metric
    sums are gathered and added in batch order, so every rank returns the one-process grid bit for
    bit. Random draws must then come from `seed=` in `generate_kwargs` (a `generator=`, or a
    sampling sampler without a seed, is refused there: its draws depend on the batches run before).

    Example:
        >>> opts = dict(steps=64, gen_length=64, block_length=32, seed=0)
        >>> sens = sensitivity(model, r, harmful, over=("layers", "steps"), window=8, generate_kwargs=opts)
        >>> fig = diffusion_lens.plot.sensitivity_heatmap(sens)
    """
    vector = check_vector(model, direction, name="direction")
    axes = (over,) if isinstance(over, str) else tuple(over)
    if not axes or len(axes) > 2 or any(a not in AXES for a in axes) or (len(axes) == 2 and axes[0] != "layers") \
            or (len(axes) == 2 and axes[1] == "layers"):
        raise ValueError(f"over must be 'layers', 'steps', 'blocks', ('layers', 'steps') or ('layers', 'blocks'); got {over!r}.")
    check_batch_size(batch_size)
    metric = _default_metric if metric is None else metric
    if not callable(metric):
        raise TypeError(f"metric must be a callable(GenerationOutput) -> values; got {type(metric).__name__}.")
    sampler, driver = split_generate_kwargs(model, generate_kwargs)
    check_batch_draws(sampler.stochastic(), driver, "sensitivity")
    prepared = prepare_prompts(model, prompts, chat=chat)
    batches = [left_pad(model, [prepared.tokens[i] for i in idx])[:2] for idx in batch_indices(model, prepared, batch_size)]

    def batch_total(hooks, tokens, mask) -> tuple[float, int]:
        """(sum of the metric over the batch's prompts, prompts) for one batch under `hooks`."""
        out = model.generate(tokens, attention_mask=mask, hooks=hooks, sampler=sampler,
                             **{"progress": False, "return_trajectory": False, **driver})
        values = torch.as_tensor(metric(out), dtype=torch.float64).flatten()
        n = tokens.shape[0]
        if values.numel() == 1:
            return float(values) * n, n
        if values.numel() == n:
            return float(values.sum()), n
        raise ValueError(f"metric returned {values.numel()} values for a batch of {n} prompts; return one "
                         "per prompt or one for the batch.")

    n_steps, n_blocks = sampler.n_steps(), sampler.n_blocks()
    layer_list = resolve_layers(model, layers)
    rows: list = ["all"]
    if "layers" in axes:
        rows = layer_list
    col_axis = next((a for a in axes if a != "layers"), None)
    cols: list = ["all"]
    if col_axis == "steps":
        cols = _windows(n_steps, window, "step")
    elif col_axis == "blocks":
        cols = _windows(n_blocks, window or 1, "block")

    def cell_hooks(cell: int) -> list:
        """Cells in order: the grid row by row, then the baseline (no hooks), then ablation everywhere."""
        if cell == len(rows) * len(cols):
            return []
        if cell == len(rows) * len(cols) + 1:
            return ablate(model, vector, layers=layer_list)
        row, col = rows[cell // len(cols)], cols[cell % len(cols)]
        kwargs = {"steps": col} if col_axis == "steps" else {"denoise_blocks": col} if col_axis == "blocks" else {}
        return ablate(model, vector, layers=layer_list if row == "all" else [row], **kwargs)

    # one work item per (cell, batch): each rank runs its share (`my_batches`), the per-batch totals are
    # gathered and every cell adds them in batch order, as one process does (bit-identical results)
    n_cells = len(rows) * len(cols) + 2
    items = [(cell, b) for cell in range(n_cells) for b in range(len(batches))]
    mine, totals, hooks_of = my_batches(items), [], {}
    with progress_bar(len(mine), "sensitivity", progress) as bar:
        for _, (cell, b) in mine:
            if cell not in hooks_of:
                hooks_of = {cell: cell_hooks(cell)}
            totals.append(batch_total(hooks_of[cell], *batches[b]))
            bar.update()
    totals = gather_records(totals, [k for k, _ in mine])
    cell_values = []
    for cell in range(n_cells):
        total, count = 0.0, 0
        for t, n in totals[cell * len(batches): (cell + 1) * len(batches)]:
            total, count = total + t, count + n
        cell_values.append(total / count)
    values = torch.tensor(cell_values[:-2], dtype=torch.float64).reshape(len(rows), len(cols))
    baseline, full = cell_values[-2], cell_values[-1]
    return Sensitivity(
        values=values,
        row_labels=[str(r) for r in rows],
        col_labels=["all"] if col_axis is None else [_label(c) for c in cols],
        row_name="layer" if "layers" in axes else "layers",
        col_name={"steps": "steps", "blocks": "blocks", None: "steps"}[col_axis],
        baseline=baseline,
        full=full,
        metric_name="refusal rate" if metric is _default_metric else getattr(metric, "__name__", "metric"),
        extra={"n_steps": n_steps, "n_blocks": n_blocks},
    )


__all__ = ["Sensitivity", "sensitivity"]
