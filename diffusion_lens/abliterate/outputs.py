"""What a search leaves in its output folder: the front table, the Pareto plots and the chosen
trial's model in its family's original checkpoint format with `abliteration.json`."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from importlib.metadata import version
from pathlib import Path

from diffusion_lens import plot
from diffusion_lens.abliterate.study import SearchResult


def write_front(result: SearchResult, out) -> dict[str, Path]:
    """`front.json` (the Pareto front, lowest refusal first, and the proxy's rank correlation),
    `pareto.html` (interactive, plotly.js embedded: works offline) and `pareto.png` in `out`.

    Example:
        >>> write_front(result, "abl")["html"]
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [result.row(t) for t in result.trials()]
    front = result.front()
    numbers = [r["trial"] for r in front]
    summary = {"front": front, "n_trials": len(rows), "proxy_rank_correlation": _proxy(result), **result.info}
    if rows and "prefill_kl" in rows[0]:
        summary["prefill_rank_correlation"] = _proxy(result, "prefill")
    paths = {"json": out / "front.json", "html": out / "pareto.html", "png": out / "pareto.png"}
    _write_atomic(paths["json"], json.dumps(summary, indent=2) + "\n")
    _write_atomic(paths["html"], plot.pareto_plotly(rows, numbers).to_html(include_plotlyjs=True, full_html=True))
    plot.pareto_scatter(rows, numbers).savefig(paths["png"], dpi=120)
    return paths


def _proxy(result: SearchResult, proxy: str = "first_position"):
    try:
        return result.proxy_correlation(proxy)
    except ValueError as error:  # fewer than 3 trials, or a constant KL: say why instead of a number
        return str(error)


def front_table(result: SearchResult) -> str:
    """The Pareto front as text, one trial per line.

    Example:
        >>> print(front_table(result))
    """
    front = result.front()
    prefill = bool(front) and "prefill_kl" in front[0]
    lines = [f"{'trial':>5s} {'refusal':>8s} {'diffusion KL':>13s} {'first-pos KL':>13s}"
             + (f" {'prefill KL':>11s}" if prefill else "") + "  direction (scope)"]
    for r in front:
        p = r["params"]
        if p["direction"].startswith("learned_subspace"):
            where = ""  # one basis at every layer: scope and index unused
        else:
            where = f" ({p['scope']}{', index %.2f' % p['direction_index'] if p['scope'] == 'global' else ''})"
        lines.append(f"{r['trial']:5d} {r['refusal']:8.3f} {r['diffusion_kl']:13.4f} {r['first_position_kl']:13.4f}"
                     + (f" {r['prefill_kl']:11.4f}" if prefill else "") + f"  {p['direction']}{where}")
    return "\n".join(lines)


def save_abliterated(model, result: SearchResult, trial, folder) -> Path:
    """The model with trial `trial`'s edit, written with `save_pretrained` (the family's original
    format) plus `abliteration.json` (parameters, objectives, seed, data sizes, library version).
    Written to a hidden sibling first and renamed into place, so a failed save leaves nothing
    half-written; the model's own weights are restored afterwards.

    Example:
        >>> save_abliterated(model, result, result.choose(max_kl=0.1), "abl/model")
    """
    folder = Path(folder)
    trial = result.study.trials[trial] if isinstance(trial, int) else trial
    staging = folder.parent / f".{folder.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with result.edit(trial).applied(model):
            model.save_pretrained(staging)
        card = {"trial": trial.number, "params": trial.params,
                "objectives": {"refusal": trial.values[0], "diffusion_kl": trial.values[1],
                               **{k: v for k, v in trial.user_attrs.items() if k in ("first_position_kl", "prefill_kl")}},
                "study": result.study.study_name, "library": f"diffusion-lens {version('diffusion-lens')}",
                **result.info}
        (staging / "abliteration.json").write_text(json.dumps(card, indent=2) + "\n")
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
