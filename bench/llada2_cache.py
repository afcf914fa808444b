"""LLaDA2 generation with and without the exact KV cache of committed blocks (issue 14 item 4).

`LLaDA2Sampler(kv_cache=None)` (upstream's loop: every forward reads the canvas up to the current block's
end) vs `kv_cache="prefix"` (block k's first forward computes blocks k-1 and k, later ones block k only, the
rest from the cache), through `model.generate` on random LLaDA2 weights. Shape: 4 layers (layer 0 dense),
d_model 512, 8 heads / 4 kv heads of 64, 16 experts of 256 top-4 in 4 groups (topk_group 2), one shared
expert, vocab 8000; fp32; one prompt of 128 tokens, gen_length 256, block_length 32, steps 32, greedy with
threshold=1.0 (strict `>`: never reached), so every block takes its 32 forwards by the schedule (one token
each): 8 blocks x 32 = 256 forwards in both runs, unless an EOS stops both early (reported).

Both runs are checked to give the same tokens before timing; then `--repeats` rounds time each once, the
order alternating; speedup = median uncached / median cached (wall seconds).

Run: `python bench/llada2_cache.py [--repeats 2] [--threads 1]`; prints the figures and writes
`bench_out/llada2_cache.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import REPO_ROOT  # noqa: E402
from forward_families import random_checkpoint  # noqa: E402
from llada2 import llada2_config  # noqa: E402

from diffusion_lens import HookedDiffusionTransformer  # noqa: E402

SHAPE = dict(d_model=512, n_layers=4, n_heads=8, n_kv=4, d_head=64, d_dense=1408, n_experts=16, top_k=4,
             d_expert=256, n_group=4, topk_group=2, vocab=8000)
RUN = dict(gen_length=256, block_length=32, steps=32, threshold=1.0, temperature=0.0)
PROMPT = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = llada2_config(**SHAPE)
    vocab = SHAPE["vocab"]
    options = dict(RUN, mask_id=vocab - 1, eos_id=vocab - 3, chat=False, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = HookedDiffusionTransformer.from_pretrained(random_checkpoint(Path(tmp), config, 0, expert_bias_std=0.01))
    model.eval()
    prompt = torch.randint(0, vocab - 3, (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def run(kv_cache):
        with torch.inference_mode():
            return model.generate(prompt, kv_cache=kv_cache, **options)

    plain, cached = run(None), run("prefix")
    if not plain.sequences.equal(cached.sequences) or plain.n_forwards != cached.n_forwards:
        raise SystemExit("kv_cache='prefix' changed the tokens: not timing a wrong result")
    times = {"uncached": [], "cached": []}
    for r in range(args.repeats):
        for name in (("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")):
            t0 = time.perf_counter()
            run(None if name == "uncached" else "prefix")
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = dict(shape=SHAPE, run=RUN, prompt=PROMPT, threads=args.threads, n_forwards=plain.n_forwards,
                  seconds=times, median=median, speedup=median["uncached"] / median["cached"])
    print(f"{plain.n_forwards} forwards; uncached {median['uncached']:.2f} s, cached {median['cached']:.2f} s, "
          f"speedup {result['speedup']:.2f}x (same tokens)")
    out = REPO_ROOT / "bench_out" / "llada2_cache.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
