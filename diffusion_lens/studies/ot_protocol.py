"""The steering protocol of "An Optimal Transport View of Activation Steering in MDMs" (Lek et al.)
as one function, `run_ot_protocol`, and one command, `diffusion-lens ot-protocol MODEL --out DIR`.

Calibration: `positive` prompts (carrying an instruction) and `negative` ones (the same requests
without it), 128 + 128 in the paper. From them: the difference-of-means direction of every layer
(residual stream, pooled over the step-0 canvas) and three transport maps negative -> positive at
`sites` (Mean-ACT, Gaussian OT, Linear-ACT; one sample per prompt pooled over the canvas, as in the
paper). Each method's free choice is made on the `validation` records (10 in the paper), by
instruction-level accuracy, ties to the weaker setting:

==============================  =========================================================
method                          chosen on validation
==============================  =========================================================
none                            nothing (the unsteered model)
ablation                        the layer whose direction is projected out of every layer
addition                        the layer, then the coefficient alpha in `strengths`
mean / gaussian / linear        the strength lambda in `strengths` (T_l = (1 - l) a + l T(a))
==============================  =========================================================

Then every method runs once on the `test` records (64 in the paper) and is scored with the IFEval
checks of `diffusion_lens.evals.instruction_following`: per-constraint (instruction id) accuracy,
prompt-level and instruction-level accuracy, each with a 95% Wilson interval. `write_protocol`
saves results.json, a table, the radar plot and the fitted maps (at strength 1; the chosen strength
is in results.json), so `lm_eval --model diffusion-lens --model_args steer=DIR/maps/linear.safetensors,
strength=L` evaluates the chosen map on the real IFEval.

On the embedded models `toy_sets` builds the sets from the toy data's verifiable format instructions
("Answer in capital letters." -> change_case:english_capital; "End your answer with the word DONE."
and its Chinese forms -> startend:end_checker).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.evals import generate_texts, instruction_following
from diffusion_lens.plot import radar_chart
from diffusion_lens.steering import ablate, add, collect_activations, fit_transport, mean_difference
from diffusion_lens.studies.tiny_refusal.data import FORMATS, generate_dataset, select

#: The methods compared, in the paper's order, with their display names.
METHODS: dict[str, str] = {"none": "no steering", "ablation": "directional ablation", "addition": "activation addition",
                           "mean": "Mean-ACT", "gaussian": "Gaussian OT", "linear": "Linear-ACT"}
STRENGTHS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
#: The toy data's format instructions as IFEval instructions: (format, language) -> (id, kwargs).
TOY_INSTRUCTIONS = {("upper", "en"): ("change_case:english_capital", {}),
                    ("done", "en"): ("startend:end_checker", {"end_phrase": "DONE"}),
                    ("done", "zh"): ("startend:end_checker", {"end_phrase": "完成"})}


def wilson_interval(passed: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% with z = 1.96): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 / n or n / n, the usual case on
    64 test prompts.

    Example:
        >>> wilson_interval(0, 10)
        (0.0, 0.2775...)
    """
    if total <= 0 or not 0 <= passed <= total:
        raise ValueError(f"wilson_interval needs 0 <= passed <= total and total > 0; got {passed} of {total}.")
    p, n = passed / total, total
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class MethodResult:
    """One method on the test records: the choice made on validation (`choice`: setting -> value;
    `validation`: setting -> {value tried: validation accuracy}; the layer of activation addition is
    tried at alpha 1) and the test scores, each a dict(accuracy, low, high, passed, n) with its 95%
    Wilson interval."""

    method: str
    choice: dict
    validation: dict
    prompt_level: dict
    instruction_level: dict
    by_instruction: dict[str, dict]


@dataclass
class OTProtocolResult:
    """Every method's `MethodResult` and the run's settings.

    Example:
        >>> result = run_ot_protocol(model, **toy_sets(), generate_kwargs=dict(gen_length=32, steps=32))
        >>> print(result.table())
        >>> result.methods["linear"].instruction_level["accuracy"] - result.methods["none"].instruction_level["accuracy"]
    """

    methods: dict[str, MethodResult]
    constraints: list[str]
    info: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)  # kind -> the fitted AffineMap, at strength 1

    def table(self) -> str:
        """Accuracy [95% interval] per method: prompt level, instruction level, each constraint.

        Example:
            >>> print(result.table())      # one row per method, "0.89 [0.79, 0.95]" cells
        """
        head = ["method", "choice", "prompt-level", "instruction-level", *self.constraints]
        rows = [head]
        for name, res in self.methods.items():
            choice = ", ".join(f"{k} {v}" for k, v in res.choice.items()) or "-"
            cells = [res.prompt_level, res.instruction_level, *(res.by_instruction.get(c) for c in self.constraints)]
            rows.append([METHODS[name], choice, *(_cell(c) for c in cells)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def radar_axes(self) -> dict[str, dict[str, float]]:
        """Test accuracy per method and constraint, for `diffusion_lens.plot.radar_chart`; with fewer
        than 3 constraints (the toy model has 2) the prompt- and instruction-level accuracies are axes too.

        Example:
            >>> radar_chart(result.radar_axes())
        """
        out = {}
        for name, res in self.methods.items():
            axes = {c: res.by_instruction[c]["accuracy"] for c in self.constraints}  # same test records for all
            if len(self.constraints) < 3:
                axes |= {"prompt level": res.prompt_level["accuracy"],
                         "instruction level": res.instruction_level["accuracy"]}
            out[METHODS[name]] = axes
        return out

    def to_dict(self) -> dict:
        """Everything but the maps, JSON-ready (`write_protocol` saves the maps beside it).

        Example:
            >>> json.dumps(result.to_dict())        # what results.json holds
        """
        return {"constraints": self.constraints, "info": self.info,
                "methods": {name: vars(res) for name, res in self.methods.items()}}


def _cell(score: Optional[dict]) -> str:
    if score is None:
        return "-"
    return f"{score['accuracy']:.2f} [{score['low']:.2f}, {score['high']:.2f}]"


def _score(passed: int, total: int) -> dict:
    low, high = wilson_interval(passed, total)
    return {"accuracy": passed / total, "low": low, "high": high, "passed": passed, "n": total}


def _check_records(records, name: str) -> list[dict]:
    if isinstance(records, (str, bytes)) or not records:
        raise ValueError(f"{name} must be a non-empty list of IFEval records (prompt, instruction_id_list, kwargs).")
    bad = [i for i, r in enumerate(records) if not {"prompt", "instruction_id_list"} <= set(r)]
    if bad:
        raise ValueError(f"{name} records {bad[:5]} lack 'prompt' or 'instruction_id_list' (IFEval records; "
                         "diffusion_lens.prompts.ifeval_records reads google/IFEval rows).")
    return list(records)


def run_ot_protocol(model: HookedDiffusionTransformer, positive: Sequence[str], negative: Sequence[str],
                    validation: Sequence[dict], test: Sequence[dict], *, sites: Optional[Sequence[str]] = None,
                    methods: Sequence[str] = tuple(METHODS), strengths: Sequence[float] = STRENGTHS,
                    generate_kwargs: Optional[dict] = None, batch_size: int = 16, log=print) -> OTProtocolResult:
    """Run the protocol (module docstring): calibrate on `positive` / `negative`, choose each method's
    setting on `validation`, score every method on `test`. `sites`: where the maps act (default:
    every block's attention and MLP outputs, which fold into the weights). `generate_kwargs`: the
    sampler options of every generation (gen_length, steps, block_length, ...).

    Example:
        >>> sets = toy_sets(n_calibration=128, n_validation=10, n_test=64)
        >>> result = run_ot_protocol(model, **sets, generate_kwargs=dict(gen_length=32, steps=32, block_length=32))
        >>> print(result.table())
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {unknown or '[]'}: choose some of {list(METHODS)}.")
    if not strengths or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in strengths):
        raise ValueError(f"strengths must be a non-empty list of numbers in (0, 1]; got {list(strengths)}.")
    for name, prompts in (("positive", positive), ("negative", negative)):
        if isinstance(prompts, str) or len(prompts) < 2:
            raise ValueError(f"{name} must be a list of at least 2 prompts; got {prompts!r:.60}.")
    validation, test = _check_records(validation, "validation"), _check_records(test, "test")
    options = dict(generate_kwargs or {})
    gen_length = options.get("gen_length", model.adapter.sampler(model.cfg).gen_length)
    n_layers = model.cfg.n_layers
    sites = list(sites) if sites is not None else [f"blocks.{l}.{h}" for l in range(n_layers)
                                                    for h in ("hook_attn_out", "hook_mlp_out")]
    started = time.time()

    def accuracy(records, hooks) -> dict:
        texts = generate_texts(model, [r["prompt"] for r in records], batch_size=batch_size, hooks=hooks, **options)
        return instruction_following(texts, records)

    def on_validation(hooks) -> float:
        return accuracy(validation, hooks)["instruction_level"]

    def best(candidates: dict) -> tuple:
        """The key with the highest validation accuracy; ties to the earliest (the weaker setting)."""
        scores = {key: on_validation(hooks) for key, hooks in candidates.items()}
        return max(scores, key=lambda k: (scores[k], -list(scores).index(k))), scores

    directions = mean_difference(model, positive, negative, layers="all", positions="mean_all", gen_length=gen_length,
                                 batch_size=batch_size, progress=False)
    needs_maps = [m for m in ("mean", "gaussian", "linear") if m in methods]
    maps = {}
    if needs_maps:
        source = collect_activations(model, list(negative), sites=sites, pooling="mean_all", gen_length=gen_length,
                                     batch_size=batch_size)
        target = collect_activations(model, list(positive), sites=sites, pooling="mean_all", gen_length=gen_length,
                                     batch_size=batch_size)
        maps = {kind: fit_transport(kind, source, target) for kind in needs_maps}

    chosen: dict[str, tuple[dict, dict, list]] = {}  # method -> (choice, validation scores, hooks)
    for method in methods:
        if method == "none":
            chosen[method] = ({}, {}, [])
        elif method == "ablation":
            layer, scores = best({l: ablate(model, directions.vector(l, "mean_all")) for l in range(n_layers)})
            chosen[method] = ({"layer": layer}, {"layer": scores}, ablate(model, directions.vector(layer, "mean_all")))
        elif method == "addition":
            layer, by_layer = best({l: add(model, directions.vector(l, "mean_all"), alpha=1.0, layers=l)
                                    for l in range(n_layers)})
            vector = directions.vector(layer, "mean_all")
            alpha, by_alpha = best({float(a): add(model, vector, alpha=float(a), layers=layer) for a in strengths})
            chosen[method] = ({"layer": layer, "alpha": alpha}, {"layer": by_layer, "alpha": by_alpha},
                              add(model, vector, alpha=alpha, layers=layer))
        else:
            strength, scores = best({float(s): maps[method].as_hooks(float(s)) for s in strengths})
            chosen[method] = ({"strength": strength}, {"strength": scores}, maps[method].as_hooks(strength))
        log(f"{METHODS[method]:22s} chosen on validation: {chosen[method][0] or '-'}")

    results, constraints = {}, set()
    for method, (choice, scores, hooks) in chosen.items():
        got = accuracy(test, hooks)
        passed_prompts = round(got["prompt_level"] * got["n_prompts"])
        passed_instructions = sum(p for p, _ in got["by_instruction"].values())
        results[method] = MethodResult(method, choice, scores, _score(passed_prompts, got["n_prompts"]),
                                       _score(passed_instructions, got["n_instructions"]),
                                       {iid: _score(p, n) for iid, (p, n) in sorted(got["by_instruction"].items())})
        constraints |= set(got["by_instruction"])
    info = {"seconds": round(time.time() - started, 1), "generate_kwargs": options, "sites": sites,
            "strengths": [float(s) for s in strengths], "batch_size": batch_size,
            "n": {"positive": len(positive), "negative": len(negative), "validation": len(validation), "test": len(test)}}
    return OTProtocolResult(results, sorted(constraints), info, maps)


def toy_sets(*, n_calibration: int = 128, n_validation: int = 10, n_test: int = 64, seed: int = 0) -> dict:
    """The protocol's sets from the embedded models' toy data: harmless requests of both languages,
    positive = the request with a random format instruction of its language, negative = the bare
    request (calibration from the training split), IFEval records from the validation and test splits.

    Example:
        >>> sets = toy_sets(n_calibration=128, n_validation=10, n_test=64)
        >>> sets["test"][0]["instruction_id_list"]
    """
    for name, n in (("n_calibration", n_calibration), ("n_validation", n_validation), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1; got {n!r}.")
    data = generate_dataset(n_train=16 * n_calibration, n_val=16 * n_validation, n_test=16 * n_test, seed=seed + 1)
    rng = random.Random(seed)
    pairs = [(fmt, lang) for fmt, lang in TOY_INSTRUCTIONS]

    def requests(split: str, n: int) -> list[tuple[str, str]]:
        both = [[(e.prompt, lang) for e in select(data[split], kind="harmless", lang=lang, formatted=False)]
                for lang in ("en", "zh")]
        mixed = [item for group in zip(*both) for item in group]
        if len(mixed) < n:
            raise ValueError(f"The toy data's {split} split has {len(mixed)} usable requests; {n} asked.")
        return mixed[:n]

    def instructed(prompt: str, lang: str) -> tuple[str, str, dict]:
        fmt = rng.choice([f for f, l in pairs if l == lang])
        iid, kwargs = TOY_INSTRUCTIONS[(fmt, lang)]
        return prompt + (" " if lang == "en" else "") + rng.choice(FORMATS[fmt][lang]), iid, kwargs

    calibration = requests("train", n_calibration)
    positive = [instructed(p, lang)[0] for p, lang in calibration]

    def records(split: str, n: int) -> list[dict]:
        out = []
        for prompt, lang in requests(split, n):
            text, iid, kwargs = instructed(prompt, lang)
            out.append({"prompt": text, "instruction_id_list": [iid], "kwargs": [kwargs]})
        return out

    return {"positive": positive, "negative": [p for p, _ in calibration],
            "validation": records("val", n_validation), "test": records("test", n_test)}


def write_protocol(result: OTProtocolResult, out) -> list[Path]:
    """results.json, table.txt, radar.png and maps/{kind}.safetensors (strength 1) in `out`; each
    file written beside its name first and renamed, so a failed write leaves no half file.

    Example:
        >>> write_protocol(result, "ot_out")     # [ot_out/results.json, ot_out/table.txt, ...]
    """
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    written = []

    def staged(path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.partial")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)

    staged(out / "results.json", lambda p: p.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False)))
    staged(out / "table.txt", lambda p: p.write_text(result.table() + "\n"))
    figure = radar_chart(result.radar_axes(), title="IFEval accuracy per constraint (test)")
    staged(out / "radar.png", lambda p: figure.savefig(p, format="png", dpi=120, bbox_inches="tight"))  # + legend
    for kind, amap in result.maps.items():
        staged(out / "maps" / f"{kind}.safetensors", lambda p, amap=amap: amap.save(p))
    return written


def add_arguments(parser) -> None:
    """The `ot-protocol` command's arguments.

    Example:
        >>> add_arguments(argparse.ArgumentParser())
    """
    parser.add_argument("model", help="a model name or folder (the embedded tiny-refusal uses its toy format data)")
    parser.add_argument("--out", required=True, help="folder for results.json, table.txt, radar.png and maps/")
    parser.add_argument("--positive", help="calibration prompts WITH the instructions (one per line or a JSON list)")
    parser.add_argument("--negative", help="the same requests WITHOUT them")
    parser.add_argument("--validation", help="IFEval records (JSONL in google/IFEval's format) to choose strengths on")
    parser.add_argument("--test", help="IFEval records to score on")
    parser.add_argument("--n-calibration", type=int, default=128, help="prompts per calibration side (default 128)")
    parser.add_argument("--n-validation", type=int, default=10, help="validation records (default 10)")
    parser.add_argument("--n-test", type=int, default=64, help="test records (default 64)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)


def run(args) -> OTProtocolResult:
    """The `ot-protocol` command: load, build or read the sets, run, write, print the table.

    Example:
        >>> run(parser.parse_args(["tiny-refusal", "--out", "ot_out"]))
    """
    from diffusion_lens.prompts import ifeval_records, load_ifeval
    from diffusion_lens.studies.abliteration import read_prompts

    files = [args.positive, args.negative, args.validation, args.test]
    if not any(files) and args.model != "tiny-refusal":
        raise ValueError("Give --positive, --negative, --validation and --test for a model other than tiny-refusal.")
    if any(files) and not all(files):
        raise ValueError("Give all of --positive, --negative, --validation and --test (or none, on tiny-refusal).")
    model = HookedDiffusionTransformer.from_pretrained(args.model)
    if not any(files):
        sets = toy_sets(n_calibration=args.n_calibration, n_validation=args.n_validation, n_test=args.n_test)
    else:
        sets = {"positive": read_prompts(args.positive)[: args.n_calibration],
                "negative": read_prompts(args.negative)[: args.n_calibration],
                "validation": ifeval_records(load_ifeval(path=args.validation))[: args.n_validation],
                "test": ifeval_records(load_ifeval(path=args.test))[: args.n_test]}
    options = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
    result = run_ot_protocol(model, **sets, methods=[m for m in args.methods.split(",") if m],
                             generate_kwargs=options, batch_size=args.batch_size)
    write_protocol(result, args.out)
    print(result.table())
    print(f"written to {args.out}/ (results.json, table.txt, radar.png, maps/)")
    return result
