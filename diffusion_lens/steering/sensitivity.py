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
    prepared = prepare_prompts(model, prompts, chat=chat)
    batches = [left_pad(model, [prepared.tokens[i] for i in idx])[:2] for idx in batch_indices(model, prepared, batch_size)]

    def evaluate(hooks) -> float:
        total, count = 0.0, 0
        for tokens, mask in batches:
            out = model.generate(tokens, attention_mask=mask, hooks=hooks, sampler=sampler,
                                 **{"progress": False, "return_trajectory": False, **driver})
            values = torch.as_tensor(metric(out), dtype=torch.float64).flatten()
            n = tokens.shape[0]
            if values.numel() == 1:
                total, count = total + float(values) * n, count + n
            elif values.numel() == n:
                total, count = total + float(values.sum()), count + n
            else:
                raise ValueError(f"metric returned {values.numel()} values for a batch of {n} prompts; return one "
                                 "per prompt or one for the batch.")
        return total / count

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

    values = torch.empty(len(rows), len(cols), dtype=torch.float64)
    with progress_bar(len(rows) * len(cols) + 2, "sensitivity", progress) as bar:
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                kwargs = {}
                if col_axis == "steps":
                    kwargs["steps"] = col
                elif col_axis == "blocks":
                    kwargs["denoise_blocks"] = col
                hooks = ablate(model, vector, layers=layer_list if row == "all" else [row], **kwargs)
                values[i, j] = evaluate(hooks)
                bar.update()
        baseline = evaluate([])
        bar.update()
        full = evaluate(ablate(model, vector, layers=layer_list))
        bar.update()
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
