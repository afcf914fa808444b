"""The automatic abliteration search on an embedded model (issue 16): trials per minute, peak
memory, and what recording the unmodified trajectories once saves.

    search       `diffusion_lens.abliterate.search` for --trials trials (goal on `tiny-refusal`, 2 CPU
                 cores: 60 trials in under 10 minutes, setup included): trials per minute, seconds per
                 trial, peak RSS
    per trial    one trial's measurement, timed in this run on the chosen edit: weights edited, the
                 judge's generation on the harmful prompts plus `KLReference.measure` (replay of the
                 recorded reference) / the edit as hooks, the same generation plus `masked_kl`
                 (which generates the unmodified run again: what a search without a recorded
                 reference pays, since edited weights cannot produce it)      goal < 1

Also printed: the Pareto front and the rank correlation of the first-position (proxy) KL with the
diffusion KL over the trials, then the front's lowest-refusal trial at diffusion KL <= 0.1 measured
again on held-out prompts (test split: request templates and topics the search never saw).

With `--subspace-rank K` the search also has the learned K-dim subspace candidate
(`SearchSpace.subspace_rank`); its losses and learning time are reported, and the results go to
bench_out/abliterate_subspace{K}.json.

Run: `.venv/bin/python bench/abliterate.py [--model tiny-refusal] [--trials 60] [--threads 2] [--subspace-rank 2]`.
Results go to bench_out/abliterate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_lens import HookedDiffusionTransformer  # noqa: E402
from diffusion_lens.abliterate import SearchSpace, front_table, search  # noqa: E402
from diffusion_lens.evals import generate_texts, kl_reference, masked_kl, refusal_rate  # noqa: E402
from diffusion_lens.studies.abliteration import prompt_sets  # noqa: E402
from diffusion_lens.studies.tiny_refusal import generate_dataset, prompts  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def judge(model, harmful, options, batch_size, hooks=()):
    return refusal_rate(generate_texts(model, harmful, batch_size=batch_size, hooks=list(hooks), **options))


def held_out(n: int) -> dict[str, list[str]]:
    """Test-split prompts (held-out templates and topics), n per class and language."""
    test = generate_dataset(n_train=0, n_val=0, n_test=16 * n, seed=1)["test"]
    return {kind: [p for lang in ("en", "zh") for p in prompts(test, kind=kind, lang=lang)[:n]]
            for kind in ("harmful", "harmless")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-refusal")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subspace-rank", type=int, default=0, help="add the learned K-dim subspace candidate")
    parser.add_argument("--subspace-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = HookedDiffusionTransformer.from_pretrained(args.model)
    sets = prompt_sets(args.model, None, None, args.n_train, args.n_eval)
    options = dict(gen_length=args.gen_length, steps=args.gen_length, block_length=args.gen_length)
    batch_size = 64
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = search(model, **sets, trials=args.trials, storage=f"sqlite:///{tmp}/study.db", seed=args.seed,
                        generate_kwargs=options, batch_size=batch_size, progress=False,
                        space=SearchSpace(subspace_rank=args.subspace_rank, subspace_steps=args.subspace_steps))
        seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    print(front_table(result))
    rho = result.proxy_correlation()

    chosen = result.choose(max_kl=0.1)
    edit = result.edit(chosen)
    reference = kl_reference(model, sets["harmless_eval"], generate_kwargs=options, batch_size=batch_size)
    with edit.applied(model):
        t0 = time.perf_counter()
        judge(model, sets["harmful_eval"], options, batch_size)
        reference.measure(model)
        replayed = time.perf_counter() - t0
    hooks = edit.hooks(model)  # without a reference the unmodified run must be generated again, so the edit runs as hooks
    t0 = time.perf_counter()
    judge(model, sets["harmful_eval"], options, batch_size, hooks)
    masked_kl(model, sets["harmless_eval"], hooks, batch_size=batch_size, generate_kwargs=options)
    naive = time.perf_counter() - t0

    test = held_out(args.n_eval // 2)
    test_reference = kl_reference(model, test["harmless"], generate_kwargs=options, batch_size=batch_size)
    baseline_refusal = judge(model, test["harmful"], options, batch_size)
    with edit.applied(model):
        test_refusal = judge(model, test["harmful"], options, batch_size)
        test_kl = test_reference.measure(model)

    out = {
        "model": args.model, "trials": args.trials, "seconds": round(seconds, 1),
        "trials_per_minute": round(60 * args.trials / seconds, 2), "seconds_per_trial": round(seconds / args.trials, 2),
        "peak_rss_mb": round(peak, 1), "per_trial_replay_over_regenerate": round(replayed / naive, 3),
        "proxy_rank_correlation": rho, "front": result.front(),
        "chosen": {"trial": chosen.number, "search": {"refusal": chosen.values[0], "diffusion_kl": chosen.values[1]},
                   "held_out": {"baseline_refusal": baseline_refusal, "refusal": test_refusal,
                                "diffusion_kl": test_kl.masked.mean,
                                "first_position_kl": float(test_kl.first_position.mean())}},
        "prompts": {"search": {k: len(v) for k, v in sets.items()}, "held_out": {k: len(v) for k, v in test.items()}},
        "generate_kwargs": options, "threads": args.threads, "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "learned_subspace": result.info.get("learned_subspace"),
        "trials_on_learned_subspace": sum(t.params["direction"].startswith("learned_subspace") for t in result.trials()),
    }
    print(f"\n{args.trials} trials in {seconds:.0f} s: {out['trials_per_minute']} trials/min, peak RSS {peak:.0f} MB")
    print(f"per trial, replay of the recorded reference / regenerating it (masked_kl): {out['per_trial_replay_over_regenerate']}")
    print(f"rank correlation, first-position KL vs diffusion KL over {len(result.trials())} trials: {rho:.3f}")
    print(f"chosen trial {chosen.number} (search: refusal {chosen.values[0]:.3f}, diffusion KL {chosen.values[1]:.4f}); "
          f"held-out: refusal {baseline_refusal:.3f} -> {test_refusal:.3f}, diffusion KL {test_kl.masked.mean:.4f}")
    folder = ROOT / "bench_out"
    folder.mkdir(exist_ok=True)
    if args.subspace_rank:
        learned = result.info["learned_subspace"]
        print(f"learned subspace (rank {args.subspace_rank}, from {learned['init']}): loss {learned['loss'][0]:.3f} -> "
              f"{learned['loss'][1]:.3f}, refusal log-odds {learned['refusal_log_odds'][0]:.3f} -> "
              f"{learned['refusal_log_odds'][1]:.3f}, KL {learned['kl'][0]:.4f} -> {learned['kl'][1]:.4f} in "
              f"{learned.get('seconds', float('nan')):.1f} s; "
              f"{out['trials_on_learned_subspace']} trials chose it")
    name = f"abliterate_subspace{args.subspace_rank}.json" if args.subspace_rank else "abliterate.json"
    (folder / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
