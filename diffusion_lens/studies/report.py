"""`demo_out/report.html`: the refusal study as one page people can read offline.

A styled results table (and the MoE table when the study has one), then each figure with one
sentence under it, computed from the numbers: what the figure shows, what the paper (Shnaidman et
al., "Activation Steering for Masked Diffusion Language Models") found, and whether this model
agrees. The selection and sensitivity heatmaps are interactive (plotly, its JavaScript embedded
once, so the page needs no network); each keeps its matplotlib PNG as the fallback shown when
JavaScript is off (`<noscript>`), and the PNGs are written next to the page too.

Example:
    >>> results = run_study(model, DemoSize(), "demo_out")     # calls write_report
    >>> write_report("demo_out", results, selection, grids)     # or by hand
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional

from diffusion_lens import plot

MOE_CONDITIONS = ("baseline", "combined_output", "per_expert", "non_expert", "random_control")
MOE_LABELS = {"baseline": "baseline", "combined_output": "ablated at combined MoE output",
              "per_expert": "every expert orthogonalised", "non_expert": "all but routed experts orth.",
              "random_control": "random direction, every expert orth."}
SETTING_NAMES = {"one_block": "pure diffusion", "four_blocks": "semi-autoregressive decoding"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 980px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d0d7de; }
p.lead { color: #57606a; margin-top: 0; }
table.results { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
table.results th, table.results td { border: 1px solid #d0d7de; padding: .35em .7em; }
table.results th { background: #f6f8fa; font-weight: 600; }
table.results td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.results tr:nth-child(even) td { background: #fbfcfd; }
table.results td.label { text-align: left; }
.figure { margin: 1.5em 0; } .figure img { max-width: 100%; }
p.interpretation { background: #f6f8fa; border-left: 4px solid #0969da; padding: .5em .8em; margin-top: .3em; }
.note { color: #57606a; font-size: .9em; }
"""


def _depth(layer: int, n_layers: int) -> str:
    """'early', 'middle' or 'late': the layer's third of the stack."""
    third = 3 * layer / max(n_layers, 1)
    return "early" if third < 1 else "middle" if third < 2 else "late"


def _pair(values: Optional[dict]) -> str:
    return "-" if not values else f"{values['en']:.2f} EN / {values['zh']:.2f} ZH"


def table_rows(results: dict) -> list[tuple[str, list[Optional[float]]]]:
    """The results table: (label, [held-out en, held-out zh, unseen en, unseen zh]); None = not measured.

    Example:
        >>> table_rows(results)[0]
        ('harmful refusal, baseline', [0.35, 0.12, 0.9, 0.85])
    """
    sets = ("held_out", "unseen")
    rows = []

    def row(label, pick):
        cells = []
        for name in sets:
            value = pick(name, results[name])
            cells += [value["en"], value["zh"]] if value else [None, None]
        rows.append((label, cells))

    row("harmful refusal, baseline", lambda _, r: r["baseline"]["harmful"])
    row("harmless refusal, baseline", lambda _, r: r["baseline"]["harmless"])
    row("harmful refusal, direction ablated", lambda _, r: r["ablated"]["harmful"])
    row("harmless refusal, direction ablated", lambda _, r: r["ablated"]["harmless"])
    row("harmful refusal, random direction ablated", lambda _, r: r["random_control"]["harmful"])
    if "induced" in results:
        row("harmless refusal, difference added", lambda name, _: results["induced"]["harmless"] if name == "held_out" else None)
        for label, entry in results["by_position"].items():
            row(f"harmful refusal, best {label} dir.", lambda name, _, e=entry: e["harmful"] if e and name == "unseen" else None)
        t = results["transfer"]
        row("harmful refusal, other language's dir.",
            lambda name, _: {"en": t["zh_to_en"], "zh": t["en_to_zh"]} if name == "unseen" else None)
    return rows


def results_table_html(results: dict) -> str:
    """The results table as an HTML <table> (held-out and unseen prompts, EN and ZH columns)."""
    head = ("<tr><th rowspan='2'>measurement</th><th colspan='2'>held-out templates / topics</th>"
            "<th colspan='2'>unseen prompts</th></tr><tr><th>EN</th><th>ZH</th><th>EN</th><th>ZH</th></tr>")
    body = "".join(
        f"<tr><td class='label'>{html.escape(label)}</td>"
        + "".join(f"<td class='num'>{'-' if v is None else f'{v:.2f}'}</td>" for v in cells) + "</tr>"
        for label, cells in table_rows(results))
    return f"<table class='results'>{head}{body}</table>"


def moe_table_html(moe: dict) -> str:
    """The MoE study's table: held-out harmful refusal per language and masked KL per condition."""
    head = "<tr><th>condition</th><th>harmful refusal EN</th><th>harmful refusal ZH</th><th>masked KL (nats)</th></tr>"
    body = "".join(
        f"<tr><td class='label'>{html.escape(MOE_LABELS[name])}</td><td class='num'>{moe[name]['harmful']['en']:.2f}</td>"
        f"<td class='num'>{moe[name]['harmful']['zh']:.2f}</td><td class='num'>{moe['kl_harmless'][name]:.4f}</td></tr>"
        for name in MOE_CONDITIONS)
    return f"<table class='results'>{head}{body}</table>"


def interpret_cosine(results: dict, directions) -> str:
    """One sentence under the cosine-per-layer figure."""
    best = results["best"]
    column = [str(p) for p in directions.positions].index(best["position"])
    cosine = directions.cosine[:, column].tolist()
    layers = list(directions.layers)
    lowest = layers[min(range(len(cosine)), key=cosine.__getitem__)]
    n = len(layers)
    agrees = _depth(lowest, n) != "early"
    return (f"At the selected position ({best['position']}) the harmful and harmless class means are least alike at "
            f"layer {lowest} of {n} (cosine {min(cosine):.2f}, vs {cosine[0]:.2f} at layer {layers[0]}); the paper "
            f"found refusal written as one direction in the middle-to-late layers, and this model "
            + ("agrees: the classes separate most in its " + _depth(lowest, n) + " layers." if agrees else
               "differs: its classes separate most in the early layers."))


def interpret_selection(results: dict, selection) -> str:
    """One sentence under the selection heatmap."""
    best, n = results["best"], len(selection.directions.layers)
    kept = int(selection.kept.sum())
    held = results["held_out"]
    pre = (results.get("by_position") or {}).get("pre_instruction")
    pre_text = ""
    if pre is not None:
        base = results["unseen"]["baseline"]["harmful"]
        works = all(base[lang] - pre["harmful"][lang] >= 0.5 for lang in ("en", "zh"))
        pre_text = (f"; the best pre-instruction direction alone takes unseen harmful refusal from {_pair(base)} to "
                    f"{_pair(pre['harmful'])}, so pre-instruction tokens {'work here too' if works else 'work less well here'}")
    return (f"Each cell scores one candidate direction (lower bypass = ablating it removes more refusal; {kept} of "
            f"{selection.kept.numel()} candidates pass the filters) and the boxed winner is layer {best['layer']} of {n} "
            f"({_depth(best['layer'], n)}) at {best['position']}, whose ablation takes held-out harmful refusal from "
            f"{_pair(held['baseline']['harmful'])} to {_pair(held['ablated']['harmful'])} (random direction: "
            f"{_pair(held['random_control']['harmful'])}); the paper found the direction in mid-to-late layers and at "
            f"instruction-template tokens, and this model "
            + ("agrees on the layer" if _depth(best["layer"], n) != "early" else "picks an early layer instead")
            + pre_text + ".")


def window_effects(sens: dict) -> list[float]:
    """Per step window, the largest drop in refusal that ablating one layer in that window causes."""
    columns = list(zip(*sens["values"]))
    return [sens["baseline"] - min(column) for column in columns]


def reproduces_early_steps(sens: dict, threshold: float = 0.1) -> bool:
    """True when the first step window is the most decisive one (largest single-layer drop, at least `threshold`)."""
    effects = window_effects(sens)
    return effects[0] >= threshold and effects[0] >= max(effects)


def interpret_sensitivity(setting: str, sens: dict) -> str:
    """One sentence under a sensitivity heatmap: which step window decides, compared with the paper."""
    effects = window_effects(sens)
    windows = sens["step_windows"]
    top = max(range(len(effects)), key=effects.__getitem__)
    columns = list(zip(*sens["values"]))
    top_layer = sens["layers"][min(range(len(columns[top])), key=columns[top].__getitem__)]
    commit, kwargs = sens["commit"], sens["generate_kwargs"]
    blocks = kwargs["gen_length"] // kwargs["block_length"]
    how = (f"the answer's first {commit['first_words']} tokens are committed at step "
           f"{commit['first_words_mean_step']:.1f} on average and "
           f"{commit['padding_share_first_window']:.0%} of the first window's commits are end-of-text padding")
    if reproduces_early_steps(sens):
        verdict = (f"this setting reproduces the paper's finding that the early steps decide, because {how}"
                   + (" (each block's first steps write its first words)" if blocks > 1 else ""))
    else:
        verdict = (f"this setting does not reproduce the paper's early-steps finding, because {how}"
                   + (": low-confidence remasking commits the confident padding first and the words last"
                      if commit["padding_share_first_window"] >= 0.5 else ""))
    return (f"In {SETTING_NAMES[setting]} ({blocks} block{'s' if blocks > 1 else ''} of "
            f"{kwargs['block_length']}, {kwargs['steps']} steps), ablating one layer during one window of steps lowers "
            f"harmful refusal from {sens['baseline']:.2f} by at most "
            + ", ".join(f"{e:.2f} (steps {w})" for e, w in zip(effects, windows))
            + f", most at layer {top_layer} in steps {windows[top]} (all layers and steps: {sens['all_layers_all_steps']:.2f}); "
            f"the paper found the early denoising steps decide refusal, and {verdict}.")


def _png(out: Path, name: str, fig) -> str:
    """Save a matplotlib figure as `out/name.png` and return it as an <img> data URI."""
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'


def write_report(out_dir, results: dict, selection, grids: dict, title: str = "Refusal-direction study") -> Path:
    """Write `out_dir/report.html` (and the PNGs) from `run_study`'s results, its `Selection` and its
    sensitivity grids {setting: Sensitivity}. Returns the page's path.

    Example:
        >>> write_report("demo_out", results, selection, grids).name
        'report.html'
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in grids if s not in SETTING_NAMES]
    if unknown or not grids:
        raise ValueError(f"write_report: sensitivity settings {unknown or '{}'} are not {list(SETTING_NAMES)}.")
    figures = [("cosine_per_layer", "Class means per layer", plot.cosine_per_layer(selection.directions), None,
                interpret_cosine(results, selection.directions)),
               ("selection_bypass", "Direction selection (layer x position)", plot.selection_heatmap(selection, "bypass"),
                plot.selection_heatmap_plotly(selection, "bypass"), interpret_selection(results, selection))]
    for setting, sens in grids.items():
        kwargs = results["sensitivity"][setting]["generate_kwargs"]
        blocks = kwargs["gen_length"] // kwargs["block_length"]
        name = f"{SETTING_NAMES[setting]} ({blocks} block{'s' if blocks > 1 else ''} of {kwargs['block_length']})"
        heading = f"Harmful refusal, one layer x step window ablated\n{name}"
        figures.append((f"sensitivity_{setting}", f"Step-window sensitivity: {name}",
                        plot.sensitivity_heatmap(sens, title=heading, value_range=(0.0, 1.0)),
                        plot.sensitivity_heatmap_plotly(sens, title=heading, value_range=(0.0, 1.0)),
                        interpret_sensitivity(setting, results["sensitivity"][setting])))
    parts, plotly_js = [], True
    for name, heading, png_fig, interactive, sentence in figures:
        image = _png(out, name, png_fig)
        if interactive is None:
            body = image
        else:
            div = interactive.to_html(full_html=False, include_plotlyjs=plotly_js, div_id=f"plot-{name}",
                                      config={"displaylogo": False, "responsive": True})
            plotly_js = False  # plotly.js once per page
            body = f"<div class='plotly'>{div}</div><noscript>{image}</noscript>"
        parts.append(f"<section class='figure'><h2>{html.escape(heading)}</h2>{body}"
                     f"<p class='interpretation'>{html.escape(sentence)}</p></section>")
    settled = [s for s in grids if reproduces_early_steps(results["sensitivity"][s])]
    summary = (f"Masked KL of the ablation on held-out harmless prompts: {results['kl_harmless']:.4f} nats. "
               f"Selected direction: layer {results['best']['layer']}, {results['best']['position']}. "
               "Early-steps claim reproduced in: " + (", ".join(SETTING_NAMES[s] for s in settled) or "neither setting")
               + f". Study time: {results['seconds']:.0f} s.")
    moe = ""
    if "moe" in results:
        m = results["moe"]
        moe = (f"<h2>Mixture of experts: {html.escape(m['model'])}</h2><p class='note'>{m['n_experts']} experts, top-"
               f"{m['n_experts_per_token']}; direction from layer {m['best']['layer']}, {html.escape(m['best']['position'])}; "
               "held-out harmful prompts, masked KL on held-out harmless prompts.</p>" + moe_table_html(m)
               + f"<p class='interpretation'>{html.escape(interpret_moe(m))}</p>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            "<p class='lead'>Refusal rates of the embedded model with its refusal direction ablated (every layer, step "
            "and position), on prompts from held-out templates and topics and on unseen prompts of the training "
            "templates. Hover the heatmaps for exact values.</p>"
            + results_table_html(results) + f"<p class='note'>{html.escape(summary)}</p>" + moe + "".join(parts)
            + "</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def interpret_moe(moe: dict) -> str:
    """One sentence under the MoE table: must the direction leave every expert's weights (the blog's
    finding), or does removing it at the combined MoE outputs, or everywhere but the experts, suffice?

    By linearity, ablating at a MoE layer's combined output equals orthogonalising only its experts'
    down projections; so the three edits are: the experts only, everything but the routed experts, and
    both (the full abliteration).

    Example:
        >>> interpret_moe(results["moe"])     # "Mean harmful refusal is 0.98 at baseline, ..."
    """
    def mean(name):
        return (moe[name]["harmful"]["en"] + moe[name]["harmful"]["zh"]) / 2

    base, combined, per_expert, non_expert, random_control = (mean(n) for n in MOE_CONDITIONS)
    kl = moe["kl_harmless"]
    finding = per_expert < combined - 0.1 and per_expert < non_expert
    return (f"Mean harmful refusal is {base:.2f} at baseline, {combined:.2f} with the direction removed at the combined "
            f"MoE outputs only, {non_expert:.2f} with it removed from every weight but the routed experts' (what a "
            f"MoE-unaware tool edits; KL {kl['non_expert']:.3f}) and {per_expert:.2f} with every expert edited too "
            f"(KL {kl['per_expert']:.3f}; a random direction: {random_control:.2f}); the blog found that abliterating a "
            "MoE model must edit every expert, and this model "
            + ("agrees: the full edit removes more refusal than either partial one." if finding else
               "does not show it: the full edit does not remove more refusal than both partial ones."))