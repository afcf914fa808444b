"""`make demo`: the headline study of "Activation Steering for Masked Diffusion Language Models"
(Shnaidman et al.), end to end on the embedded `tiny-refusal` model.

1. Candidate refusal directions: difference of class means at every layer's block input, at the
   pre-instruction and post-instruction chat-template tokens and pooled over the response, from one
   forward per prompt on the step-0 canvas (prompt + fully masked response), 128 harmful vs 128
   harmless training prompts (both languages).
2. Selection on a validation split: one sweep over every (layer, position) candidate of the three
   position kinds, with `select_direction`'s defaults (bypass / induce / KL scores, the Arditi
   filters with the induce filter relative to the unsteered model, see its docstring).
3. Per language, on two prompt sets never trained on nor used for selection: "held_out" (request
   templates and/or topics that no training prompt uses: generalisation) and "unseen" (training
   templates and topics, new prompts): refusal rate at baseline, with the direction ablated (every
   layer, step and position) and with a random direction ablated. Then masked-position KL and
   refusal induced by adding the raw difference (held-out harmless prompts), the best direction of
   each position type, cross-lingual transfer and a layer x step-window sensitivity grid (unseen
   harmful prompts, where the model refuses). The top-level keys of results.json (`baseline`,
   `ablated`, `random_control`) are the held-out figures; `unseen` holds the same for unseen prompts.

Results go to `<out>/results.json`, with PNG plots and `report.html` (table and plots in one page).
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_lens import HookedDiffusionTransformer, plot
from diffusion_lens.evals import masked_kl, refusal_rate
from diffusion_lens import steering
from diffusion_lens.steering import Directions, ablate, add, mean_difference, select_direction
from diffusion_lens.studies.tiny_refusal import generate_dataset, prompts

POSITION_TYPES = {"pre_instruction": "pre_instruction", "post_instruction": "post_instruction", "response_mean": "mean_response"}
LANGS = ("en", "zh")


@dataclass
class DemoSize:
    """How many prompts each part of the study uses (per language and class)."""

    n_train: int = 64  # 128 harmful vs 128 harmless in all
    n_val: int = 16
    n_test: int = 48
    gen_length: int = 32
    step_window: int = 8
    batch_size: int = 64
    position_types: tuple[str, ...] = tuple(POSITION_TYPES)
    full: bool = True  # False: selection and refusal rates only (the reduced demo of the tests)


QUICK = DemoSize(n_train=16, n_val=8, n_test=12, position_types=("post_instruction",), full=False)


def _by_lang(examples, kind: str, n: int) -> dict[str, list[str]]:
    return {lang: prompts(examples, kind=kind, lang=lang)[:n] for lang in LANGS}


def _both(split: dict[str, list[str]]) -> list[str]:
    return [p for lang in LANGS for p in split[lang]]


class Study:
    """The model, the prompt splits and the sampler settings shared by every measurement."""

    def __init__(self, model: HookedDiffusionTransformer, size: DemoSize, seed: int = 1):
        self.model, self.size = model, size
        data = generate_dataset(n_train=8 * size.n_train, n_val=8 * (size.n_val + size.n_test),
                                n_test=8 * size.n_test, seed=seed)
        self.train = {kind: _by_lang(data["train"], kind, size.n_train) for kind in ("harmful", "harmless")}
        val = {kind: _by_lang(data["val"], kind, size.n_val + size.n_test) for kind in ("harmful", "harmless")}
        # Selection uses the first n_val validation prompts; the rest are "unseen": training
        # templates and topics, but prompts never trained on and never used for selection.
        self.val = {kind: {lang: v[: size.n_val] for lang, v in by.items()} for kind, by in val.items()}
        self.unseen = {kind: {lang: v[size.n_val:] for lang, v in by.items()} for kind, by in val.items()}
        # Held-out templates and/or topics that no training prompt uses.
        self.test = {kind: _by_lang(data["test"], kind, size.n_test) for kind in ("harmful", "harmless")}
        self.generate_kwargs = dict(gen_length=size.gen_length, steps=size.gen_length, block_length=size.gen_length)

    def refusal(self, prompt_list: list[str], hooks=()) -> float:
        texts = []
        for start in range(0, len(prompt_list), self.size.batch_size):
            chunk = prompt_list[start: start + self.size.batch_size]
            texts += self.model.generate(chunk, hooks=hooks, progress=False, **self.generate_kwargs).texts
        return refusal_rate(texts)

    def refusal_by_lang(self, split: dict, kind: str, hooks=()) -> dict[str, float]:
        return {lang: self.refusal(split[kind][lang], hooks) for lang in LANGS}

    def directions(self, harmful: list[str], harmless: list[str], positions: str):
        return mean_difference(
            self.model, harmful, harmless, layers="all", positions=positions,
            gen_length=self.size.gen_length, batch_size=self.size.batch_size, progress=False,
        )


def position_type(label) -> str:
    """The position kind of a candidate's label ("pre_instruction[5]" -> "pre_instruction")."""
    return next(kind for kind, spec in POSITION_TYPES.items() if str(label).startswith(spec))


def best_per_type(selection) -> dict:
    """The kept candidate with the lowest bypass score of each position kind (None if none was kept)."""
    out = {position_type(label): None for label in selection.directions.positions}
    for row in selection.table:
        kind = position_type(row["position"])
        if row["kept"] and (out[kind] is None or row["bypass"] < out[kind]["bypass"]):
            out[kind] = {**row, "direction": selection.directions.unit(row["layer"], row["position"])}
    return out


def run_study(model: HookedDiffusionTransformer, size: DemoSize = DemoSize(), out_dir: str | Path = "demo_out",
              plots: bool = True, log=print) -> dict:
    """Run the study and return the results dict (also written to `out_dir/results.json`).

    Example:
        >>> model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
        >>> results = run_study(model, QUICK, "demo_out")
        >>> results["ablated"]["harmful"], results["random_control"]["harmful"]
    """
    started = time.time()
    study = Study(model, size)
    harmful_train, harmless_train = _both(study.train["harmful"]), _both(study.train["harmless"])
    harmful_val, harmless_val = _both(study.val["harmful"]), _both(study.val["harmless"])

    log(f"1/6 candidate directions from {len(harmful_train)} harmful vs {len(harmless_train)} harmless prompts")
    candidates = Directions.concat([study.directions(harmful_train, harmless_train, POSITION_TYPES[label])
                                    for label in size.position_types])
    selection = select_direction(model, harmful_train, harmless_train, harmful_val, harmless_val,
                                 candidates=candidates, gen_length=size.gen_length, batch_size=size.batch_size,
                                 progress=False)
    if selection.winner is None:
        raise RuntimeError("No candidate direction survived the selection filters; see the selection table.")
    best = selection.winner
    best_label = position_type(best["position"])
    direction = best["direction"]
    log(f"   selected layer {best['layer']} position {best['position']} (bypass score {best['bypass']:.2f})")

    log("2/6 refusal rates (held-out templates/topics, and unseen prompts): baseline, ablated, random control")
    ablation = ablate(model, direction)
    generator = torch.Generator().manual_seed(0)
    random_ablation = ablate(model, torch.randn(model.cfg.d_model, generator=generator, dtype=torch.float64))
    results = {}
    for name, split in (("held_out", study.test), ("unseen", study.unseen)):
        results[name] = {
            "baseline": {kind: study.refusal_by_lang(split, kind) for kind in ("harmful", "harmless")},
            "ablated": {kind: study.refusal_by_lang(split, kind, ablation) for kind in ("harmful", "harmless")},
            "random_control": {"harmful": study.refusal_by_lang(split, "harmful", random_ablation)},
        }
    results.update(results["held_out"])  # the headline keys are the held-out prompts' figures
    sens = None
    if size.full:
        sens = _full_study(study, results, selection, best_label, ablation, log)
    results["best"] = {"layer": best["layer"], "position": str(best["position"]), "position_type": best_label}
    results["selection"] = selection.table
    results["seconds"] = round(time.time() - started, 1)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if plots and sens is not None:
        _plots(out, selection, sens, format_table(results))
    return results


def _full_study(study: Study, results: dict, selection, best_label: str, ablation, log):
    """KL, induction, per-position, cross-lingual and sensitivity measurements (fills `results`)."""
    model, size = study.model, study.size
    best = selection.winner
    log("3/6 masked KL on harmless prompts and induced refusal")
    kl = masked_kl(model, _both(study.test["harmless"]), ablation, batch_size=size.batch_size,
                   generate_kwargs=study.generate_kwargs)
    results["kl_harmless"] = kl.mean
    induce = add(model, best["vector"], alpha=1.0, layers=best["layer"])
    results["induced"] = {"harmless": study.refusal_by_lang(study.test, "harmless", induce)}

    log("4/6 best direction per position type (unseen prompts, where the model refuses)")
    results["by_position"] = {
        label: {"harmful": study.refusal_by_lang(study.unseen, "harmful", ablate(model, w["direction"]))}
        if w is not None else None
        for label, w in best_per_type(selection).items()
    }

    log("5/6 cross-lingual transfer (direction from one language, ablated on the other; unseen prompts)")
    transfer = {}
    for source, target in (("en", "zh"), ("zh", "en")):
        own = study.directions(study.train["harmful"][source], study.train["harmless"][source], POSITION_TYPES[best_label])
        transferred = ablate(model, own.unit(best["layer"], best["position"]))
        transfer[f"{source}_to_{target}"] = study.refusal(study.unseen["harmful"][target], transferred)
    results["transfer"] = transfer

    log("6/6 layer x step-window sensitivity (one layer and one step window at a time; unseen prompts)")
    sens = steering.sensitivity(
        model, best["direction"], _both(study.unseen["harmful"]), over=("layers", "steps"), window=size.step_window,
        batch_size=size.batch_size, generate_kwargs=study.generate_kwargs,
    )
    results["sensitivity"] = {
        "values": sens.values.tolist(), "layers": sens.row_labels, "step_windows": [str(c) for c in sens.col_labels],
        "baseline": sens.baseline, "all_layers_all_steps": sens.full, "prompts": "unseen",
    }
    return sens


def _plots(out: Path, selection, sens, table: str) -> None:
    """PNG figures, and `report.html`: the table and the figures in one self-contained page."""
    figures = {
        "cosine_per_layer": plot.cosine_per_layer(selection.directions),
        "selection_bypass": plot.selection_heatmap(selection, "bypass"),
        "sensitivity": plot.sensitivity_heatmap(sens, title="Harmful refusal rate, ablating one layer x step window"),
    }
    images = []
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        encoded = base64.b64encode((out / f"{name}.png").read_bytes()).decode()
        images.append(f'<h2>{name}</h2><img src="data:image/png;base64,{encoded}">')
    page = ("<!doctype html><meta charset='utf-8'><title>tiny-refusal refusal-direction study</title>"
            f"<h1>Refusal-direction study</h1><pre>{html.escape(table)}</pre>" + "".join(images))
    (out / "report.html").write_text(page, encoding="utf-8")


def format_table(results: dict) -> str:
    """The printed summary: one row per measurement, columns en / zh for each prompt set."""
    sets = ("held_out", "unseen")
    lines = [f"{'':44s} " + "   ".join(f"{name:>13s}" for name in sets),
             f"{'':44s} " + "   ".join(f"{'en':>6s} {'zh':>6s}" for _ in sets)]

    def row(label, pick):
        values = [pick(results[name]) for name in sets]
        cells = ["   ".join(f"{v['en']:6.2f} {v['zh']:6.2f}" if v else f"{'-':>6s} {'-':>6s}" for v in values)]
        lines.append(f"{label:44s} " + cells[0])

    row("harmful refusal, baseline", lambda r: r["baseline"]["harmful"])
    row("harmless refusal, baseline", lambda r: r["baseline"]["harmless"])
    row("harmful refusal, direction ablated", lambda r: r["ablated"]["harmful"])
    row("harmless refusal, direction ablated", lambda r: r["ablated"]["harmless"])
    row("harmful refusal, random direction ablated", lambda r: r["random_control"]["harmful"])
    if "induced" in results:
        row("harmless refusal, difference added", lambda r: results["induced"]["harmless"] if r is results["held_out"] else None)
        for label, entry in results["by_position"].items():
            row(f"harmful refusal, best {label} dir.", lambda r, e=entry: e["harmful"] if e and r is results["unseen"] else None)
        t = results["transfer"]
        row("harmful refusal, other language's dir.",
            lambda r: {"en": t["zh_to_en"], "zh": t["en_to_zh"]} if r is results["unseen"] else None)
        lines.append(f"masked KL on harmless prompts (nats): {results['kl_harmless']:.4f}")
    best = results["best"]
    lines.append(f"selected direction: layer {best['layer']}, {best['position']} ({best['position_type']})")
    if "sensitivity" in results:
        sens = results["sensitivity"]
        lines.append("sensitivity, harmful refusal on unseen prompts (rows: ablated layer; columns: step windows "
                     + ", ".join(sens["step_windows"]) + f"; no ablation {sens['baseline']:.2f}, "
                     f"all layers and steps {sens['all_layers_all_steps']:.2f}):")
        for layer, values in zip(sens["layers"], sens["values"]):
            lines.append(f"  layer {layer}: " + " ".join(f"{v:5.2f}" for v in values))
    lines.append(f"took {results['seconds']:.0f} s")
    return "\n".join(lines)


def run_demo(out_dir: str = "demo_out", quick: bool = False) -> dict:
    """`python -m diffusion_lens demo`: the study on the embedded model, its table printed.

    Example:
        >>> results = run_demo("demo_out", quick=True)   # QUICK: selection and refusal rates, about a minute
    """
    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    print(model)
    results = run_study(model, QUICK if quick else DemoSize(), out_dir)
    print()
    print(format_table(results))
    print(f"\nwrote {Path(out_dir) / 'results.json'}" + ("" if quick else ", PNG plots and report.html"))
    return results
