"""Score a tiny-refusal checkpoint on one split: refusal rate per (kind, language) and the rate of
exactly-correct answers to harmless requests.

    python -m diffusion_lens.studies.tiny_refusal.evaluate diffusion_lens/pretrained/tiny-refusal --split dev

Why a separate split: the recipe (data, sizes, steps) is tuned on ``dev``, whose action templates
and entity topics no training prompt uses, so generalisation can be tuned without ever looking at
``test``, the held-out split the demo reports.
"""

from __future__ import annotations

import argparse
import json

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.evals import refusal_rate
from diffusion_lens.studies.tiny_refusal.data import LANGS, Example, answer_is_correct, generate_dataset, select

GENERATE = dict(gen_length=32, steps=32, block_length=32)
"""The demo's sampler setting: one block, one token per step."""


def responses(model: HookedDiffusionTransformer, examples: list[Example], batch_size: int = 64) -> list[str]:
    """The model's answers to the examples' prompts (LLaDA's low-confidence sampler, `GENERATE`)."""
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = [e.prompt for e in examples[start: start + batch_size]]
        texts += model.generate(chunk, progress=False, **GENERATE).texts
    return texts


def score(model: HookedDiffusionTransformer, examples: list[Example], batch_size: int = 64) -> dict:
    """``{"refusal": {kind: {lang: rate}}, "exact_answers": {lang: rate}}`` on these examples.

    Example:
        >>> dev = generate_dataset(n_train=0, n_val=0, n_test=0, n_dev=64, stage="aligned")["dev"]
        >>> score(HookedDiffusionTransformer.from_pretrained("tiny-refusal"), dev)["refusal"]["harmful"]["en"]
    """
    texts = dict(zip((e.prompt for e in examples), responses(model, examples, batch_size)))
    result: dict = {"refusal": {}, "exact_answers": {}, "n": len(examples)}
    for kind in ("harmful", "harmless"):
        result["refusal"][kind] = {lang: refusal_rate([texts[e.prompt] for e in select(examples, kind=kind, lang=lang)])
                                   for lang in LANGS}
    for lang in LANGS:
        harmless = select(examples, kind="harmless", lang=lang)
        result["exact_answers"][lang] = sum(answer_is_correct(e, texts[e.prompt]) for e in harmless) / len(harmless)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder or embedded name")
    parser.add_argument("--split", choices=("val", "dev"), default="dev",
                        help="val: training templates and topics, new prompts; dev: held-out for tuning (never test)")
    parser.add_argument("-n", type=int, default=256, help="examples (balanced over kind and language)")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    sizes = {"n_train": 0, "n_val": 0, "n_test": 0, f"n_{args.split}": args.n}
    examples = generate_dataset(**sizes, stage="aligned", seed=args.seed)[args.split]
    model = HookedDiffusionTransformer.from_pretrained(args.model)
    print(json.dumps(score(model, examples), indent=2))


if __name__ == "__main__":
    main()
