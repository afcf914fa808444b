"""`diffusion-lens abliterate MODEL --trials N --out DIR` (also `python -m diffusion_lens abliterate`):
the automatic abliteration search of `diffusion_lens.abliterate` from the command line.

Prompts: `--harmful FILE --harmless FILE` (one prompt per line, or a JSON list of strings); the
first `--n-train` of each give the candidate directions and the next `--n-eval` the objectives.
On the embedded models (`tiny-refusal`, `tiny-refusal-moe`) they default to the toy data: training
prompts for the directions, validation prompts for the objectives (both languages). `--out` gets
the study (`study.db`, SQLite: rerun the command to resume it or add trials), `front.json`,
`pareto.html`, `pareto.png` and, unless `--no-save`, `model/`: the front trial with the lowest
refusal at diffusion KL <= `--max-kl`, in the family's original format with `abliteration.json`.
`--subspace-rank K` adds a learned K-dim subspace to the candidates (`SearchSpace.subspace_rank`;
its losses go to front.json's "learned_subspace").
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.abliterate import SearchSpace, front_table, save_abliterated, search, write_front
from diffusion_lens.studies.tiny_refusal import generate_dataset, prompts

EMBEDDED = ("tiny-refusal", "tiny-refusal-moe")


def read_prompts(path) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSON list of strings.

    Example:
        >>> read_prompts("harmful.txt")[:2]
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path} must hold a JSON list of prompt strings.")
        return data
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_sets(model_name: str, harmful, harmless, n_train: int, n_eval: int) -> dict[str, list[str]]:
    """The four prompt sets of a search: from the files, or the toy data for an embedded model.

    Example:
        >>> sets = prompt_sets("tiny-refusal", None, None, n_train=64, n_eval=32)
        >>> search(model, **sets, trials=60)
    """
    if harmful is None and harmless is None:
        if model_name not in EMBEDDED:
            raise ValueError(f"Give --harmful FILE and --harmless FILE for {model_name!r}; only the embedded models "
                             f"{EMBEDDED} have default prompts.")
        data = generate_dataset(n_train=16 * n_train, n_val=16 * n_eval, n_test=0, seed=1)

        def both(split, kind, n):
            return [p for lang in ("en", "zh") for p in prompts(data[split], kind=kind, lang=lang)[: n // 2]]

        return {"harmful_train": both("train", "harmful", n_train), "harmless_train": both("train", "harmless", n_train),
                "harmful_eval": both("val", "harmful", n_eval), "harmless_eval": both("val", "harmless", n_eval)}
    if harmful is None or harmless is None:
        raise ValueError("Give both --harmful and --harmless (or neither, on an embedded model).")
    bad, good = read_prompts(harmful), read_prompts(harmless)
    for name, items in (("--harmful", bad), ("--harmless", good)):
        if len(items) < n_train + n_eval:
            raise ValueError(f"{name} has {len(items)} prompts; --n-train {n_train} + --n-eval {n_eval} need "
                             f"{n_train + n_eval}. Lower them or add prompts.")
    return {"harmful_train": bad[:n_train], "harmless_train": good[:n_train],
            "harmful_eval": bad[n_train: n_train + n_eval], "harmless_eval": good[n_train: n_train + n_eval]}


def run(args) -> dict:
    """The command: search, then the front's files and (unless --no-save) the chosen model.

    Example:
        >>> from diffusion_lens.__main__ import main
        >>> main(["abliterate", "tiny-refusal", "--trials", "60", "--out", "abl"])     # calls run(args)
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = HookedDiffusionTransformer.from_pretrained(args.model)
    sets = prompt_sets(args.model, args.harmful, args.harmless, args.n_train, args.n_eval)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    generate_kwargs = dict(gen_length=args.gen_length, steps=args.steps or args.gen_length,
                           block_length=args.block_length or args.gen_length)
    space = SearchSpace(norm_preserving=(False, True) if args.norm_preserving == "search"
                        else (args.norm_preserving == "on",), subspace_rank=args.subspace_rank,
                        subspace_steps=args.subspace_steps)
    n_steps = generate_kwargs["steps"]
    if args.kl_every < 1 or args.kl_max_gb <= 0:
        raise ValueError(f"--kl-every must be >= 1 and --kl-max-gb > 0; got {args.kl_every}, {args.kl_max_gb}.")
    result = search(model, **sets, trials=args.trials, storage=storage, study_name=args.study, seed=args.seed,
                    space=space, generate_kwargs=generate_kwargs, batch_size=args.batch_size,
                    kl_steps=range(0, n_steps, args.kl_every), kl_max_bytes=int(args.kl_max_gb * 2**30))
    paths = write_front(result, out)
    print(front_table(result))
    print(f"wrote {paths['json']}, {paths['html']}, {paths['png']} (study: {storage})")
    if not args.no_save:
        chosen = result.choose(max_kl=args.max_kl)
        folder = save_abliterated(model, result, chosen, out / "model")
        print(f"wrote {folder}: trial {chosen.number}, refusal {chosen.values[0]:.3f}, diffusion KL {chosen.values[1]:.4f}")
    return {"front": result.front(), "paths": paths}


def add_arguments(parser) -> None:
    """The `abliterate` subcommand's options.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["tiny-refusal", "--trials", "4", "--out", "abl"]).kl_every      # 1
    """
    parser.add_argument("model", help="a hub id, a local checkpoint folder, or an embedded model (tiny-refusal)")
    parser.add_argument("--trials", type=int, required=True, help="trials to run (added to a resumed study)")
    parser.add_argument("--out", required=True, help="output folder (study.db, front.json, pareto.html/png, model/)")
    parser.add_argument("--storage", help="an SQLAlchemy URL for the study (default: sqlite in --out)")
    parser.add_argument("--study", default="abliteration", help="study name inside the storage")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the search (default 0); workers sharing one study need different seeds")
    parser.add_argument("--harmful", help="harmful prompts: a text file, one per line, or a JSON list")
    parser.add_argument("--harmless", help="harmless prompts, same format")
    parser.add_argument("--n-train", type=int, default=64, help="prompts per class for the directions")
    parser.add_argument("--n-eval", type=int, default=32, help="prompts per class for the objectives")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, help="denoising steps (default: gen-length)")
    parser.add_argument("--block-length", type=int, help="semi-autoregressive block length (default: gen-length)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kl-every", type=int, default=1, help="score the diffusion KL at every K-th step (default 1)")
    parser.add_argument("--kl-max-gb", type=float, default=1.0, help="bound on the recorded KL reference (default 1 GiB)")
    parser.add_argument("--norm-preserving", choices=("off", "on", "search"), default="off")
    parser.add_argument("--subspace-rank", type=int, default=0,
                        help="learn a K-dim refusal subspace before the search, one more candidate (default 0: off)")
    parser.add_argument("--subspace-steps", type=int, default=20, help="gradient steps of that learning (default 20)")
    parser.add_argument("--max-kl", type=float, default=0.1, help="the saved trial's diffusion KL bound")
    parser.add_argument("--no-save", action="store_true", help="do not write the chosen model")
