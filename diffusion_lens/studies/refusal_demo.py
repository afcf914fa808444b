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
   harmful prompts, where the model refuses) in two sampler settings: pure diffusion (one block of
   `gen_length`) and semi-autoregressive blocks (four blocks), with the step at which each setting
   commits the answer's first words. The top-level keys of results.json (`baseline`, `ablated`,
   `random_control`) are the held-out figures; `unseen` holds the same for unseen prompts.
4. `run_moe_study` (the MoE model `tiny-refusal-moe`, a shorter study): the same selection, then
   held-out harmful refusal and masked KL with the direction removed at the MoE layers' combined
   output only, from every expert's weights (full abliteration) and from every weight but the
   routed experts' (what a MoE-unaware abliterator edits), and a random direction removed from
   every expert's weights (the control).

Results go to `<out>/results.json`, with PNG plots and `report.html` (`diffusion_lens.studies.report`).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.evals import generate_texts, masked_kl, refusal_rate
from diffusion_lens import steering
from diffusion_lens.steering import Directions, ablate, add, mean_difference, orthogonalize_weights, select_direction
from diffusion_lens.studies import report
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
    n_sensitivity: int = 24  # unseen harmful prompts per language in each sensitivity grid (one batch of 48)
    batch_size: int = 64
    position_types: tuple[str, ...] = tuple(POSITION_TYPES)
    full: bool = True  # False: selection and refusal rates only (the reduced demo of the tests)


QUICK = DemoSize(n_train=16, n_val=8, n_test=12, position_types=("post_instruction",), full=False, n_sensitivity=6)
# The MoE model's shorter study: fewer prompts, selection and held-out refusal / KL only.
MOE = DemoSize(n_train=32, n_val=8, n_test=32, full=False)
MOE_MODEL = "tiny-refusal-moe"
FIRST_WORDS = 4  # the answer's first tokens, whose commit step `commit_order` reports


def sampler_settings(gen_length: int) -> dict[str, dict]:
    """The two sampler settings of the sensitivity grid: pure diffusion (one block) and four
    semi-autoregressive blocks, both one token per step.

    Example:
        >>> sampler_settings(32)["four_blocks"]
        {'gen_length': 32, 'steps': 32, 'block_length': 8}
    """
    if gen_length % 4:
        raise ValueError(f"gen_length={gen_length} must split into four equal blocks; use a multiple of 4.")
    return {"one_block": dict(gen_length=gen_length, steps=gen_length, block_length=gen_length),
            "four_blocks": dict(gen_length=gen_length, steps=gen_length, block_length=gen_length // 4)}


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

    def refusal(self, prompt_list: list[str], hooks=(), model: HookedDiffusionTransformer | None = None) -> float:
        """Refusal rate of `model` (default: the study's; e.g. a weight-edited copy) with `hooks`."""
        model = self.model if model is None else model
        return refusal_rate(generate_texts(model, prompt_list, batch_size=self.size.batch_size, hooks=hooks,
                                           **self.generate_kwargs))

    def refusal_by_lang(self, split: dict, kind: str, hooks=(), model=None) -> dict[str, float]:
        return {lang: self.refusal(split[kind][lang], hooks, model) for lang in LANGS}

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


def _select(study: Study, log):
    """Candidate directions at every layer and position kind, and `select_direction`'s pick."""
    model, size = study.model, study.size
    harmful_train, harmless_train = _both(study.train["harmful"]), _both(study.train["harmless"])
    harmful_val, harmless_val = _both(study.val["harmful"]), _both(study.val["harmless"])
    log(f"   candidate directions from {len(harmful_train)} harmful vs {len(harmless_train)} harmless prompts")
    candidates = Directions.concat([study.directions(harmful_train, harmless_train, POSITION_TYPES[label])
                                    for label in size.position_types])
    selection = select_direction(model, harmful_train, harmless_train, harmful_val, harmless_val,
                                 candidates=candidates, gen_length=size.gen_length, batch_size=size.batch_size,
                                 progress=False)
    if selection.winner is None:
        raise RuntimeError(f"No candidate direction of {model.cfg.model_name} survived the selection filters; "
                           "see the selection table (selection.table).")
    best = selection.winner
    log(f"   selected layer {best['layer']} position {best['position']} (bypass score {best['bypass']:.2f})")
    return selection


def run_study(model: HookedDiffusionTransformer, size: DemoSize = DemoSize(), out_dir: str | Path = "demo_out",
              plots: bool = True, log=print, moe: dict | None = None) -> dict:
    """Run the study and return the results dict (also written to `out_dir/results.json`); with
    `plots` and `size.full`, PNG figures and `report.html`. `moe`: a `run_moe_study` result, stored
    as `results["moe"]` and reported alongside.

    Example:
        >>> model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
        >>> results = run_study(model, QUICK, "demo_out")
        >>> results["ablated"]["harmful"], results["random_control"]["harmful"]
    """
    started = time.time()
    study = Study(model, size)
    log("1/6 direction selection")
    selection = _select(study, log)
    best = selection.winner
    best_label = position_type(best["position"])
    direction = best["direction"]

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
    if moe is not None:
        results["moe"] = moe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if plots and sens is not None:
        report.write_report(out, results, selection, sens, title=f"{model.cfg.model_name}: refusal-direction study")
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

    log("6/6 layer x step-window sensitivity in two sampler settings, one block and four blocks (unseen prompts)")
    harmful = _both({lang: v[: size.n_sensitivity] for lang, v in study.unseen["harmful"].items()})
    results["sensitivity"] = {"prompts": f"unseen, {len(harmful)} harmful"}
    grids = {}
    for setting, kwargs in sampler_settings(size.gen_length).items():
        grids[setting] = steering.sensitivity(
            model, best["direction"], harmful, over=("layers", "steps"), window=size.step_window,
            batch_size=size.batch_size, generate_kwargs=kwargs, progress=False,
        )
        sens = grids[setting]
        results["sensitivity"][setting] = {
            "generate_kwargs": kwargs, "values": sens.values.tolist(), "layers": sens.row_labels,
            "step_windows": [str(c) for c in sens.col_labels], "baseline": sens.baseline,
            "all_layers_all_steps": sens.full, "commit": commit_order(model, harmful, kwargs, size),
        }
    return grids


@torch.no_grad()
def commit_order(model, prompt_list: list[str], generate_kwargs: dict, size: DemoSize) -> dict:
    """When the sampler commits what: the mean step at which each of the answer's first `FIRST_WORDS` tokens is
    unmasked, and the share of the first step window's commits that are end-of-text padding (EOS /
    EOT / pad). Explains which steps a step-window ablation can still change.

    Example:
        >>> commit_order(model, harmful, sampler_settings(32)["one_block"], DemoSize())
        {'first_words': 4, 'first_words_mean_step': 27.1, 'padding_share_first_window': 0.97, 'window': 8}
    """
    cfg = model.cfg
    padding = torch.tensor(sorted({t for t in (cfg.eos_token_id, cfg.eot_token_id, cfg.pad_token_id) if t is not None}))
    first_words, padding_first, first_window = [], 0, 0
    for start in range(0, len(prompt_list), size.batch_size):
        out = model.generate(prompt_list[start: start + size.batch_size], progress=False, **generate_kwargs)
        response = out.trajectory[:, :, out.response_start:]  # [steps batch gen]
        committed = response != cfg.mask_token_id
        step = (~committed).sum(0)  # [batch gen]: the step index that unmasked each token
        first_words.append(step[:, :FIRST_WORDS].double().flatten())
        early = step < size.step_window
        padding_first += int((early & torch.isin(out.responses, padding)).sum())
        first_window += int(early.sum())
    return {"first_words": FIRST_WORDS, "first_words_mean_step": round(float(torch.cat(first_words).mean()), 2),
            "padding_share_first_window": round(padding_first / max(first_window, 1), 3), "window": size.step_window}


def moe_conditions(model: HookedDiffusionTransformer, direction, seed: int = 0) -> dict[str, tuple]:
    """The MoE study's five conditions as (model, hooks, runtime hooks with the same effect):

    * `baseline`: the model, no hooks;
    * `combined_output`: `direction` ablated at run time at every MoE layer's combined output
      (`blocks.{l}.hook_mlp_out`, the experts' weighted sum) and nowhere else;
    * `per_expert`: `orthogonalize_weights` on a copy (embedding, attention, every expert's and the
      shared expert's down projection: the full abliteration; runtime twin `ablate(model, r)`);
    * `non_expert`: the same edit on a copy with the routed experts' weights left as they were
      (what a MoE-unaware abliterator edits); its runtime twin ablates the embedding
      (`blocks.0.hook_resid_pre`), every attention output, dense layers' MLP outputs and the
      shared expert's output;
    * `random_control`: the `per_expert` edit with a random direction (`torch.randn`, `seed`)
      instead of `direction`, so that what `per_expert` removes is not just any edit's damage.

    The runtime twins measure masked KL (`masked_kl` compares hooks on one model); a test checks
    that each equals its edited copy.

    Example:
        >>> conditions = moe_conditions(moe, r)
        >>> edited, hooks, _ = conditions["non_expert"]
        >>> edited.generate("How do I pick a lock?", hooks=hooks)
    """
    cfg = model.cfg
    if not cfg.moe_layers:
        raise ValueError(f"{cfg.model_name} has no mixture-of-experts layer (cfg.moe_layers is empty); "
                         "moe_conditions needs a LLaDA-MoE-format model such as tiny-refusal-moe.")
    if model.unembed.weight is model.embed.weight:
        raise ValueError("moe_conditions: a tied LM head reads the edited embedding too; its non_expert runtime "
                         "twin is not modelled. Use an untied model.")
    unit = torch.as_tensor(direction, dtype=torch.float64)
    unit = unit / unit.norm()
    combined = ablate(model, unit, layers=list(cfg.moe_layers), sites=("hook_mlp_out",))

    per_expert = copy.deepcopy(model)
    edited = orthogonalize_weights(per_expert, unit)
    non_expert = copy.deepcopy(model)
    routed = [name for name in orthogonalize_weights(non_expert, unit) if ".mlp.experts." in name]
    if not routed:
        raise ValueError(f"orthogonalize_weights edited no routed expert of {cfg.model_name} ({edited[:4]}...); "
                         "expected names under blocks.{l}.mlp.experts.")
    originals = dict(model.named_parameters())
    with torch.no_grad():
        for name in routed:
            non_expert.get_parameter(name).copy_(originals[name])

    dense = [layer for layer in range(cfg.n_layers) if layer not in cfg.moe_layers]
    non_expert_hooks = ablate(model, unit, layers=[0], sites=("hook_resid_pre",)) \
        + ablate(model, unit, sites=("hook_attn_out",)) \
        + (ablate(model, unit, layers=dense, sites=("hook_mlp_out",)) if dense else [])
    if cfg.d_shared_expert_mlp:
        non_expert_hooks += [(f"blocks.{layer}.mlp.hook_shared_out", _projection(unit)) for layer in cfg.moe_layers]
    random_unit = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    random_unit = random_unit / random_unit.norm()
    random_control = copy.deepcopy(model)
    orthogonalize_weights(random_control, random_unit)
    return {"baseline": (model, [], []), "combined_output": (model, combined, combined),
            "per_expert": (per_expert, [], ablate(model, unit)), "non_expert": (non_expert, [], non_expert_hooks),
            "random_control": (random_control, [], ablate(model, random_unit))}


def _projection(unit):
    """A hook removing `unit`'s component: x <- x - (x.u) u (the shared expert's output has no `ablate` site)."""
    def hook(x, hook):
        u = unit.to(x.device, x.dtype)
        return x - (x @ u)[..., None] * u
    return hook


def run_moe_study(model: HookedDiffusionTransformer, size: DemoSize = MOE, log=print) -> dict:
    """The shorter study on a LLaDA-MoE-format model: direction selection with the dense study's
    recipe, then per condition of `moe_conditions` the held-out harmful refusal per language and the
    masked KL on held-out harmless prompts. Returns the dict stored as `results["moe"]`.

    Example:
        >>> moe = HookedDiffusionTransformer.from_pretrained("tiny-refusal-moe")
        >>> out = run_moe_study(moe, MOE)
        >>> out["per_expert"]["harmful"], out["combined_output"]["harmful"], out["kl_harmless"]
    """
    started = time.time()
    if not model.cfg.moe_layers:
        raise ValueError(f"run_moe_study needs a mixture-of-experts model; {model.cfg.model_name} has no MoE layer.")
    study = Study(model, size)
    log(f"MoE study on {model.cfg.model_name}: direction selection")
    with warnings.catch_warnings():
        if model.cfg.attention_mask_mode == "ignored":  # warned once here instead of at every batch
            log(f"   {model.cfg.model_name} ignores the attention mask, as upstream LLaDA-MoE does: in a batch, "
                "left pads take part in attention (the model was trained that way)")
            warnings.filterwarnings("ignore", message="This model ignores the attention mask")
        selection = _select(study, log)
        best = selection.winner
        log("   held-out harmful refusal and masked KL per condition: " + ", ".join(report.MOE_CONDITIONS))
        harmless = _both(study.test["harmless"])
        out: dict = {"kl_harmless": {}}
        for name, (edited, hooks, runtime) in moe_conditions(model, best["direction"]).items():
            out[name] = {"harmful": study.refusal_by_lang(study.test, "harmful", hooks, model=edited)}
            out["kl_harmless"][name] = 0.0 if not runtime else masked_kl(
                model, harmless, runtime, batch_size=size.batch_size, generate_kwargs=study.generate_kwargs).mean
    out["best"] = {"layer": best["layer"], "position": str(best["position"]), "position_type": position_type(best["position"])}
    out["model"] = model.cfg.model_name
    out["moe_layers"] = list(model.cfg.moe_layers)
    out["n_experts"], out["n_experts_per_token"] = model.cfg.n_experts, model.cfg.n_experts_per_token
    out["prompts"] = {"harmful": "held_out", "kl": "held-out harmless"}
    out["seconds"] = round(time.time() - started, 1)
    return out


def format_table(results: dict) -> str:
    """The printed summary: one row per measurement, columns en / zh for each prompt set."""
    lines = [f"{'':44s} " + "   ".join(f"{name:>13s}" for name in ("held_out", "unseen")),
             f"{'':44s} " + "   ".join(f"{'en':>6s} {'zh':>6s}" for _ in range(2))]
    for label, cells in report.table_rows(results):
        text = [f"{'-':>6s}" if v is None else f"{v:6.2f}" for v in cells]
        lines.append(f"{label:44s} {text[0]} {text[1]}   {text[2]} {text[3]}")
    if "kl_harmless" in results:
        lines.append(f"masked KL on harmless prompts (nats): {results['kl_harmless']:.4f}")
    best = results["best"]
    lines.append(f"selected direction: layer {best['layer']}, {best['position']} ({best['position_type']})")
    for setting, sens in results.get("sensitivity", {}).items():
        if setting == "prompts":
            continue
        kwargs, commit = sens["generate_kwargs"], sens["commit"]
        lines.append(f"sensitivity, {setting} (block_length {kwargs['block_length']}), harmful refusal on unseen prompts "
                     f"(rows: ablated layer; columns: step windows; no ablation {sens['baseline']:.2f}, all layers "
                     f"and steps {sens['all_layers_all_steps']:.2f}; first {commit['first_words']} answer tokens "
                     f"committed at step {commit['first_words_mean_step']:.1f} on average):")
        lines.append("  " + " " * 9 + " ".join(f"{w:>6s}" for w in sens["step_windows"]))
        for layer, values in zip(sens["layers"], sens["values"]):
            lines.append(f"  layer {layer:>2s} " + " ".join(f"{v:6.2f}" for v in values))
    if "moe" in results:
        lines.append(format_moe_table(results["moe"]))
    lines.append(f"took {results['seconds']:.0f} s")
    return "\n".join(lines)


def format_moe_table(moe: dict) -> str:
    """The MoE study's printed table: held-out harmful refusal per language and masked KL per condition."""
    labels = {name: "harmful refusal, " + report.MOE_LABELS[name] for name in report.MOE_CONDITIONS}
    width = max(map(len, labels.values()))
    lines = [f"MoE model {moe['model']} ({moe['n_experts']} experts, top-{moe['n_experts_per_token']}; direction: "
             f"layer {moe['best']['layer']}, {moe['best']['position']}), held-out prompts:",
             f"  {'':{width}s} {'en':>6s} {'zh':>6s} {'KL':>8s}"]
    for name, label in labels.items():
        harmful = moe[name]["harmful"]
        lines.append(f"  {label:{width}s} {harmful['en']:6.2f} {harmful['zh']:6.2f} {moe['kl_harmless'][name]:8.4f}")
    return "\n".join(lines)


def run_demo(out_dir: str = "demo_out", quick: bool = False) -> dict:
    """`python -m diffusion_lens demo`: the dense study on `tiny-refusal` and the shorter MoE study on
    `tiny-refusal-moe`; their tables printed, `report.html` written.

    Example:
        >>> results = run_demo("demo_out", quick=True)   # QUICK: selection and refusal rates, about a minute
    """
    started = time.time()
    moe_model = HookedDiffusionTransformer.from_pretrained(MOE_MODEL)
    print(moe_model)
    moe = run_moe_study(moe_model, QUICK if quick else MOE)
    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    print(model)
    results = run_study(model, QUICK if quick else DemoSize(), out_dir, moe=moe)
    print()
    print(format_table(results))
    print(f"\nwrote {Path(out_dir) / 'results.json'}" + ("" if quick else ", PNG plots and report.html")
          + f" in {time.time() - started:.0f} s")
    return results
