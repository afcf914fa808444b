"""What a KV cache does to steering: refusal rate, masked KL and token agreement, uncached vs prefix vs dual.

Issue 12 (item 4). On the embedded `tiny-refusal` model, with the refusal direction selected as
`make demo` selects it (difference of class means at the post-instruction tokens, `select_direction`'s
defaults; the demo's QUICK sizes), three interventions run under `kv_cache=None`, `"prefix"` and
`"dual"` with the same sampler settings (quota schedule, temperature 0):

* **ablate**: the selected direction ablated at every layer, step and position, on harmful prompts
  (refusal falls from ~0.9 to 0);
* **add**: the selected raw mean difference added at its layer, on harmless prompts (refusal rises;
  alpha 4: alpha 1, the demo's, induces almost none on this model, alpha 2 about a quarter);
* **linear-act**: a Linear-ACT map (`fit_transport("linear", ...)`) from harmless to harmful
  activations at every layer's attention and MLP output (mean over the step-0 canvas, as Lek et
  al.), on harmless prompts. Rodriguez et al. transport activations *towards* a concept to induce
  it; on this model the one concept with a clean on/off read-out is refusal, so the map induces
  refusal and its effect is read with the same `refusal_rate` as the addition's (the reverse map,
  harmful to harmless, bypasses refusal completely, which the ablation rows already show).

Per row: refusal rate; **masked KL**: at each cached forward of the cached steered run, the KL
(uncached steered forward on the same canvas || cached steered forward) over the still-masked
positions of its window, averaged over every (prompt, cached step, masked position); the uncached
forward is the same driver's full forward with the same hooks, run by `generate(replay=...)` on
the recorded canvases; **agreement**: fraction of response tokens equal to the uncached steered
run's; **effect KL**: KL(uncached unsteered || uncached steered) at the same positions and canvases,
the size of the intervention itself, to read the masked KL against. Unsteered rows (`none`) give
the cache's own KL, the floor against which steering's is read.
Prompts: the demo's "unseen" split (training templates and topics, prompts never trained on nor used
for selection), where the unsteered model refuses ~90% of harmful prompts; on the held-out
templates it refuses under half, which would leave the ablation little to remove.

Sampler: gen_length 32, steps 32 (the demo's), block_length 8: four denoising blocks, so that the
prefix cache (window: the block and everything after it) and the dual cache (window: the block)
differ; with the demo's single block they would compute the same columns. The uncached rows use
float64 confidences (`confidence_dtype`), as Fast-dLLM's loop does, so that caching is the only
difference between the rows.

    .venv/bin/python bench/steering_cache.py            # ~5 min on a quiet 2-core machine

Prints the table and writes `bench_out/steering_cache.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.evals import kl_divergence, refusal_rate
from diffusion_lens.steering import ablate, add, fit_transport, mean_difference, select_direction
from diffusion_lens.studies.refusal_demo import LANGS, QUICK, Study

SAMPLER = dict(gen_length=32, steps=32, block_length=8)
MODES = (None, "prefix", "dual")
ADD_ALPHA = 4.0
# With the quota schedule and refresh="block", a block's first step is its full forward; the others read the cache.
CACHED_STEPS = [s for s in range(SAMPLER["steps"]) if s % (SAMPLER["steps"] * SAMPLER["block_length"] // SAMPLER["gen_length"])]


def _both(split: dict[str, list[str]]) -> list[str]:
    """Both languages' prompts of a {lang: prompts} split, English first."""
    return [prompt for lang in LANGS for prompt in split[lang]]


def select(model: HookedDiffusionTransformer, study: Study) -> dict:
    """The demo's selection (post-instruction candidates, `select_direction` defaults): the winner's row."""
    size = study.size
    harmful, harmless = _both(study.train["harmful"]), _both(study.train["harmless"])
    candidates = mean_difference(model, harmful, harmless, layers="all", positions="post_instruction",
                                 gen_length=size.gen_length, batch_size=size.batch_size, progress=False)
    selection = select_direction(model, harmful, harmless, _both(study.val["harmful"]), _both(study.val["harmless"]),
                                 candidates=candidates, gen_length=size.gen_length, batch_size=size.batch_size,
                                 progress=False)
    if selection.winner is None:
        raise RuntimeError("No candidate direction survived the selection filters; see selection.table.")
    return selection.winner


def interventions(model: HookedDiffusionTransformer, study: Study, best: dict) -> dict[str, tuple[list, str]]:
    """{name: (hooks, prompt kind it runs on)}: unsteered baselines and the three interventions."""
    sites = [f"blocks.{layer}.{site}" for layer in range(model.cfg.n_layers) for site in ("hook_attn_out", "hook_mlp_out")]
    linear = fit_transport("linear", _both(study.train["harmless"]), _both(study.train["harmful"]), model=model,
                           sites=sites, gen_length=study.size.gen_length, batch_size=study.size.batch_size)
    return {
        "none/harmful": ([], "harmful"),
        "none/harmless": ([], "harmless"),
        "ablate": (ablate(model, best["direction"]), "harmful"),
        "add": (add(model, best["vector"], alpha=ADD_ALPHA, layers=best["layer"]), "harmless"),
        "linear-act": (linear.as_hooks(), "harmless"),
    }


def uncached_replay(model: HookedDiffusionTransformer, run, hooks: list, steps: list[int]) -> dict[int, torch.Tensor]:
    """Full-canvas logits of `run`'s forwards at `steps`, recomputed without the KV cache, with `hooks`.

    The recorded states become full forwards (no window, no cache) and `generate(replay=...)` runs
    them on the recorded canvases: the same driver, hooks and `hook.state` steps, every column fresh.
    """
    full = [dataclasses.replace(s, kv_cache=None, window=None, cache_step=None, model_input=s.canvas) for s in run.states]
    mask = None if run.attention_mask is None else run.attention_mask[:, : run.response_start]
    replay = model.generate(run.sequences[:, : run.response_start], attention_mask=mask, progress=False,
                            replay=dataclasses.replace(run, states=full), hooks=hooks, capture_logits=steps)
    return replay.logits


def masked_kls(model: HookedDiffusionTransformer, run, hooks: list) -> tuple[float, float]:
    """(cache KL, effect KL) of `run`, each a mean over the still-masked window positions of its cached forwards.

    cache KL: KL(uncached steered || cached steered), what the cache changes; effect KL: KL(uncached
    unsteered || uncached steered) at the same positions, what the intervention itself changes.
    """
    steps = [s.step for s in run.states if s.is_cached_forward]
    steered, unsteered = uncached_replay(model, run, hooks, steps), uncached_replay(model, run, [], steps)
    cache_kl, effect_kl, count = 0.0, 0.0, 0
    for step in steps:
        state = run.states[step]
        window = state.computed
        masked = state.canvas[:, window] == state.mask_id
        full = model.token_logits(steered[step])[:, window]  # tiny-refusal is LLaDA: no logit shift in a window
        cache_kl += float(kl_divergence(full, run.logits[step])[masked].sum())
        effect_kl += float(kl_divergence(model.token_logits(unsteered[step])[:, window], full)[masked].sum())
        count += int(masked.sum())
    return cache_kl / count, effect_kl / count


def measure(model: HookedDiffusionTransformer, study: Study, steered: dict) -> list[dict]:
    """One row per (intervention, cache mode), printed as it comes; the uncached run is each one's reference."""
    rows = []
    for name, (hooks, kind) in steered.items():
        prompts = _both(study.unseen[kind])
        reference = None
        for mode in MODES:
            started = time.perf_counter()
            options = dict(kv_cache=mode) if mode else dict(confidence_dtype=torch.float64)
            capture = [] if mode is None else CACHED_STEPS
            run = model.generate(prompts, hooks=hooks, progress=False, record=mode is not None, capture_logits=capture,
                                 **SAMPLER, **options)
            seconds = time.perf_counter() - started
            response = run.sequences[:, run.response_start:]
            if mode is None:
                reference = response
            cache_kl, effect_kl = (0.0, None) if mode is None else masked_kls(model, run, hooks)
            rows.append({
                "intervention": name, "prompts": f"{kind} x{len(prompts)}", "kv_cache": str(mode),
                "refusal": refusal_rate(run.texts), "masked_kl": cache_kl, "effect_kl": effect_kl,
                "agreement": float((response == reference).float().mean()),
                "forwards": run.n_forwards, "generate_s": round(seconds, 1),
            })
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'intervention':14s} {'prompts':13s} {'kv_cache':8s} {'refusal':>7s} {'masked KL':>10s} {'effect KL':>10s} "
          f"{'agreement':>9s} {'forwards':>8s} {'gen s':>6s}")


def format_row(row: dict) -> str:
    effect = "-" if row["effect_kl"] is None else f"{row['effect_kl']:.4f}"
    return (f"{row['intervention']:14s} {row['prompts']:13s} {row['kv_cache']:8s} {row['refusal']:7.2f} "
            f"{row['masked_kl']:10.4f} {effect:>10s} {row['agreement']:9.3f} {row['forwards']:8d} {row['generate_s']:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--n-test", type=int, default=12, help="unseen prompts per language and class")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    torch.set_grad_enabled(False)
    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    study = Study(model, dataclasses.replace(QUICK, n_test=args.n_test))
    best = select(model, study)
    print(f"selected direction: layer {best['layer']}, {best['position']} (bypass score {best['bypass']:.2f})")
    print(f"sampler: {SAMPLER}, quota schedule, temperature 0; torch threads {torch.get_num_threads()}\n")
    print(HEADER)
    rows = measure(model, study, interventions(model, study, best))
    seconds = round(time.time() - started, 1)
    print(f"\ntook {seconds:.0f} s")
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    result = {"sampler": SAMPLER, "selected": {"layer": best["layer"], "position": str(best["position"])},
              "rows": rows, "seconds": seconds, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__}
    (out / "steering_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'steering_cache.json'}")


if __name__ == "__main__":
    main()
