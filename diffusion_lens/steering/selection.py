"""Direction selection (Arditi et al., adapted to masked diffusion) and layer / step sensitivity.

For every candidate (layer, position) mean difference r computed on the training prompts:

* bypass score: mean refusal score on harmful validation prompts with r ablated everywhere
  (`ablate(model, r)`, every layer) -- lower is better;
* induce score: mean refusal score on harmless validation prompts with the raw mean difference
  added (coefficient +1) at the candidate's layer block input, every position;
* KL: mean KL(unsteered || ablated) of the prediction at the first masked response position on
  the harmless validation prompts.

The refusal score is the log-odds of refusal-opening tokens at the first masked response
position of the step-0 canvas (`diffusion_lens.evals.refusal_score`). Candidates are discarded if a
score is NaN, KL > `kl_threshold` (0.1), the induce score does not exceed the unsteered harmless
score (`induce_threshold="baseline"`; a number is Arditi's absolute threshold, 0.0), or
layer >= `max_layer_fraction` (0.8) x n_layers; the winner is the lowest bypass score among
the rest.

Why the induce filter is relative by default. Arditi et al. require the induce score to be > 0:
in an autoregressive model the prediction after the chat template *is* the first token of the
answer, so adding the direction should make a refusal opener more likely than not. In a masked
diffusion model the step-0 prediction at the first response position is made with the whole
response still masked: it is a marginal over every answer the model might write, spread over many
openers, and that position is not even decided first (the sampler commits positions by
confidence, in any order). Adding the direction then raises the refusal log-odds of harmless
prompts without lifting them above 0 (on `tiny-refusal`, from -4.7 to about -3; on such models
Arditi's threshold discards every candidate). The filter keeps its purpose, rejecting
directions that do not push towards refusal, by asking for a higher refusal score than the
unsteered model gives the same harmless prompts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.results_io import load_result, prefixed, save_result, subset
from diffusion_lens.evals.scores import first_response_logits, kl_divergence, log_odds, resolve_refusal_tokens
from diffusion_lens.prompts.batching import PromptsInput, prepare_prompts
from diffusion_lens.prompts.distributed import gather_records, my_batches
from diffusion_lens.steering._common import LayerSpec, progress_bar, require_pandas
from diffusion_lens.steering.directions import Directions, mean_difference
from diffusion_lens.steering.interventions import ablate, add
from diffusion_lens.steering.positions import PositionSpec, parse_positions


@dataclass
class Selection:
    """Result of `select_direction`: score grids [layer pos], the table of rows, and the winner.

    `bypass`, `induce`, `kl` are [len(layers) len(positions)] float64 tensors aligned with
    `directions.layers` / `directions.positions`; `kept` is the boolean filter result and
    `reasons[i][j]` says why a candidate was discarded ("" if kept). `winner` is a dict with
    layer, position, scores, `direction` (unit) and `vector` (raw mean difference), or None.

    Example:
        >>> sel = select_direction(model, harm_tr, harmless_tr, harm_val, harmless_val)
        >>> sel.winner["layer"], sel.winner["position"], sel.winner["bypass"]
        >>> fig = diffusion_lens.plot.selection_heatmap(sel)
    """

    directions: Directions
    bypass: Float[Tensor, "layer pos"]
    induce: Float[Tensor, "layer pos"]
    kl: Float[Tensor, "layer pos"]
    kept: Tensor
    reasons: list[list[str]]
    winner: Optional[dict]
    baseline: dict = field(default_factory=dict)

    @property
    def table(self) -> list[dict]:
        """One dict per candidate: layer, position, bypass, induce, kl, kept, reason.

        Example:
            >>> [row for row in sel.table if row["kept"]][:3]
        """
        rows = []
        for i, layer in enumerate(self.directions.layers):
            for j, pos in enumerate(self.directions.positions):
                rows.append({
                    "layer": layer, "position": pos, "bypass": float(self.bypass[i, j]),
                    "induce": float(self.induce[i, j]), "kl": float(self.kl[i, j]),
                    "kept": bool(self.kept[i, j]), "reason": self.reasons[i][j],
                })
        return rows

    def to_pandas(self):
        """The table as a pandas DataFrame (pandas is installed with `datasets`).

        Example:
            >>> df = sel.to_pandas()
            >>> df[df.kept].sort_values("bypass").head()
        """
        return require_pandas("Selection.to_pandas()").DataFrame(self.table)

    def save(self, path) -> Path:
        """Write to the folder `path` (safetensors + JSON, no pickle; see `diffusion_lens.core.results_io`).

        Example:
            >>> sel.save("runs/selection")
            >>> r = Selection.load("runs/selection").winner["direction"]
        """
        dir_tensors, dir_meta = self.directions._state()
        tensors = {"bypass": self.bypass, "induce": self.induce, "kl": self.kl, "kept": self.kept,
                   **prefixed(dir_tensors, "directions")}
        winner = None
        if self.winner is not None:
            winner = {k: v for k, v in self.winner.items() if not isinstance(v, Tensor)}
            tensors.update({f"winner.{k}": v for k, v in self.winner.items() if isinstance(v, Tensor)})
        meta = {"directions": dir_meta, "reasons": self.reasons, "winner": winner, "baseline": self.baseline}
        return save_result(path, "Selection", tensors, meta)

    @classmethod
    def load(cls, path) -> "Selection":
        """Read a selection written by `Selection.save` (tensors on the CPU).

        Example:
            >>> sel = Selection.load("runs/selection")
            >>> sel.to_pandas().query("kept").sort_values("bypass").head()
        """
        tensors, meta = load_result(path, "Selection")
        winner = meta["winner"]
        if winner is not None:
            winner = {**winner, **subset(tensors, "winner")}
        return cls(Directions._from_state(subset(tensors, "directions"), meta["directions"]), tensors["bypass"],
                   tensors["induce"], tensors["kl"], tensors["kept"], meta["reasons"], winner, meta["baseline"])


def _filter_by_score(model, prepared, ids, keep_positive: bool, fwd: dict, name):
    scores = log_odds(first_response_logits(model, prepared, **fwd), ids)
    keep = (scores > 0) if keep_positive else (scores < 0)
    if not bool(keep.any()):
        raise ValueError(f"Filtering {name} by refusal score left no prompt; pass filter_prompts=False.")
    chosen = keep.nonzero().flatten().tolist()
    return type(prepared)([prepared.tokens[i] for i in chosen], prepared.template,
                          None if prepared.texts is None else [prepared.texts[i] for i in chosen])


def select_direction(
    model,
    harmful_train: PromptsInput,
    harmless_train: PromptsInput,
    harmful_val: PromptsInput,
    harmless_val: PromptsInput,
    *,
    candidates: Optional[Directions] = None,
    layers: LayerSpec = "all",
    positions: PositionSpec = "post_instruction",
    refusal_tokens: Optional[Sequence[int]] = None,
    kl_threshold: float = 0.1,
    induce_threshold: Union[float, str] = "baseline",
    max_layer_fraction: float = 0.8,
    filter_prompts: bool = False,
    gen_length: int = 128,
    batch_size: int = 16,
    chat: Optional[bool] = None,
    column: Optional[str] = None,
    progress: bool = True,
) -> Selection:
    """Sweep (layer, position) candidate directions and pick the refusal direction (Arditi et al.).

    `candidates` defaults to `mean_difference(model, harmful_train, harmless_train, layers=layers,
    positions=positions)`. `filter_prompts=True` keeps harmful prompts with base refusal score > 0
    and harmless ones with score < 0 (train and validation), as Arditi et al. do. See the module
    docstring for the scores and filters, and for why `induce_threshold="baseline"` (keep a
    candidate if adding it raises the harmless refusal score above the unsteered one) is the
    default for masked diffusion models rather than Arditi's absolute 0.0 (still available:
    `induce_threshold=0.0`). The prompt sets may be `datasets.Dataset`s (prompt column detected,
    or named with `column=`). `progress=False` turns off the bar over candidates.

    Inside a `torch.distributed` process group (torchrun, accelerate launch) the candidates'
    `mean_difference` is sharded by batches (float64 round-off) and the candidates are shared
    round-robin over the ranks, each scored on all validation prompts by one rank and gathered: with
    `candidates=` given, every rank returns the one-process selection bit for bit.

    Example:
        >>> sel = select_direction(model, harm_tr, ok_tr, harm_val, ok_val, positions="post_instruction")
        >>> r = sel.winner["direction"]
        >>> out = model.generate(harmful_test, hooks=ablate(model, r))
    """
    positions = parse_positions(positions)
    ids = resolve_refusal_tokens(model, refusal_tokens)
    fwd = dict(gen_length=gen_length, batch_size=batch_size)
    if isinstance(induce_threshold, str) and induce_threshold != "baseline":
        raise ValueError(f"induce_threshold must be 'baseline' or a number; got {induce_threshold!r}.")
    numbers = [("kl_threshold", kl_threshold), ("max_layer_fraction", max_layer_fraction)]
    if not isinstance(induce_threshold, str):
        numbers.append(("induce_threshold", induce_threshold))
    for name, value in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise TypeError(f"{name} must be a number; got {value!r}.")
    sets = {
        name: prepare_prompts(model, value, chat=chat, argument=name, column=column)
        for name, value in (("harmful_train", harmful_train), ("harmless_train", harmless_train),
                            ("harmful_val", harmful_val), ("harmless_val", harmless_val))
    }
    if filter_prompts:
        for name in sets:
            sets[name] = _filter_by_score(model, sets[name], ids, name.startswith("harmful"), fwd, name)
    if candidates is None:
        candidates = mean_difference(model, sets["harmful_train"], sets["harmless_train"], layers=layers,
                                     positions=positions, gen_length=gen_length, batch_size=batch_size,
                                     progress=progress)
    elif not isinstance(candidates, Directions):
        raise TypeError(f"candidates must be a Directions object; got {type(candidates).__name__}.")
    harmful_val_p, harmless_val_p = sets["harmful_val"], sets["harmless_val"]

    base_harmless = first_response_logits(model, harmless_val_p, **fwd)
    base_harmful = first_response_logits(model, harmful_val_p, **fwd)
    baseline = {"harmful": float(log_odds(base_harmful, ids).mean()), "harmless": float(log_odds(base_harmless, ids).mean())}
    if induce_threshold == "baseline":
        induce_limit, induce_label = baseline["harmless"], f"the unsteered harmless score {baseline['harmless']:.3g}"
    else:
        induce_limit, induce_label = float(induce_threshold), str(induce_threshold)

    n_l, n_p = len(candidates.layers), len(candidates.positions)
    bypass = torch.full((n_l, n_p), float("nan"), dtype=torch.float64)
    induce, kl = bypass.clone(), bypass.clone()

    def scores(cell: tuple[int, int]) -> Optional[tuple[float, float, float]]:
        """(bypass, kl, induce) of one candidate, each a mean over all its validation prompts."""
        i, j = cell
        raw = candidates.directions[i, j]
        if not bool(raw.norm() > 0):
            return None
        ablation = ablate(model, raw)
        by = log_odds(first_response_logits(model, harmful_val_p, hooks=ablation, **fwd), ids).mean()
        steered = first_response_logits(model, harmless_val_p, hooks=ablation, **fwd)
        added = first_response_logits(model, harmless_val_p, hooks=add(model, raw.float(), 1.0,
                                                                       layers=candidates.layers[i]), **fwd)
        return float(by), float(kl_divergence(base_harmless, steered).mean()), float(log_odds(added, ids).mean())

    # candidates are shared round-robin over the ranks of a torch.distributed group (each candidate's
    # scores computed whole, on all validation prompts, by one rank) and gathered: bit-identical
    cells = [(i, j) for i in range(n_l) for j in range(n_p)]
    mine = my_batches(cells)
    bar = progress_bar(len(mine), "select_direction", progress)
    measured = []
    for _, cell in mine:
        measured.append(scores(cell))
        bar.update()
    bar.close()
    for (i, j), values in zip(cells, gather_records(measured, [k for k, _ in mine])):
        if values is not None:
            bypass[i, j], kl[i, j], induce[i, j] = values

    kept = torch.ones((n_l, n_p), dtype=torch.bool)
    reasons = [["" for _ in range(n_p)] for _ in range(n_l)]
    for i, layer in enumerate(candidates.layers):
        for j in range(n_p):
            why = []
            if not bool(candidates.directions[i, j].norm() > 0):
                why.append("zero direction (the classes do not differ here)")
            elif any(math.isnan(float(t[i, j])) for t in (bypass, induce, kl)):
                why.append("nan score")
            else:
                if kl[i, j] > kl_threshold:
                    why.append(f"kl {float(kl[i, j]):.3g} > {kl_threshold}")
                if induce[i, j] <= induce_limit:
                    why.append(f"induce {float(induce[i, j]):.3g} <= {induce_label}")
            if layer >= max_layer_fraction * model.cfg.n_layers:
                why.append(f"layer {layer} >= {max_layer_fraction} x {model.cfg.n_layers}")
            reasons[i][j] = "; ".join(why)
            kept[i, j] = not why
    winner = None
    if bool(kept.any()):
        masked = torch.where(kept, bypass, torch.full_like(bypass, float("inf")))
        flat = int(masked.argmin())
        i, j = divmod(flat, n_p)
        layer, pos = candidates.layers[i], candidates.positions[j]
        winner = {
            "layer": layer, "position": pos, "bypass": float(bypass[i, j]), "induce": float(induce[i, j]),
            "kl": float(kl[i, j]), "direction": candidates.unit(layer, pos), "vector": candidates.vector(layer, pos),
        }
    else:
        counts = {}
        for row in reasons:
            for reason in row:
                for part in reason.split("; "):
                    key = part.split(" ")[0]
                    counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        warnings.warn(f"select_direction: every candidate was filtered out (failed filters: {summary}); see "
                      "Selection.reasons or Selection.to_pandas().", stacklevel=2)
    return Selection(candidates, bypass, induce, kl, kept, reasons, winner, baseline)


__all__ = ["Selection", "select_direction"]
