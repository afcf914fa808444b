"""The `make demo` job: load the embedded model, list its hook points, cache a forward, show
what it predicts at the masked positions."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from diffusion_lens.model import HookedDiffusionTransformer

EMBEDDED_TINY = Path(__file__).parent / "data" / "llada-tiny-mha"


def run_demo(out_dir: str = "demo_out") -> None:
    model = HookedDiffusionTransformer.from_pretrained(EMBEDDED_TINY)
    print(model)

    groups = defaultdict(list)
    for name in model.hook_dict:
        groups[name.split(".", 2)[-1] if name.startswith("blocks.") else name].append(name)
    per_block = sum(names[0].startswith("blocks.") for names in groups.values())
    print(f"\n{len(model.hook_dict)} hook points ({per_block} kinds in each of {model.cfg.n_layers} blocks, "
          f"{len(groups) - per_block} at the top level):")
    for kind, names in groups.items():
        print(f"  {'blocks.{l}.' + kind if names[0].startswith('blocks.') else kind:40s} x{len(names)}")

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (1, 8), generator=generator)
    canvas = torch.cat([prompt, torch.full((1, 8), model.cfg.mask_token_id)], dim=1)
    logits, cache = model.run_with_cache(canvas)
    print(f"\nrun_with_cache on a canvas of 8 prompt tokens + 8 masks: {len(cache)} activations cached")
    print(f"  {'hook':32s} {'shape':>18s} {'mean':>8s} {'std':>8s} {'norm/pos':>9s}")
    for layer in range(model.cfg.n_layers):
        for kind in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"):
            act = cache[f"blocks.{layer}.{kind}"]
            print(f"  blocks.{layer}.{kind:23s} {str(tuple(act.shape)):>18s} {act.mean():8.3f} {act.std():8.3f} "
                  f"{act.norm(dim=-1).mean():9.3f}")
    lens = cache.accumulated_resid(apply_ln=True) @ model.W_U
    print(f"\nlogit lens reproduces the logits at the last layer: max |diff| = {(lens[-1] - logits).abs().max():.2e}")

    probs = logits[0, 8:].softmax(-1)
    top = probs.topk(3, dim=-1)
    print("\ntop-3 predictions (token id: prob) at each masked position:")
    for pos, (ids, ps) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=8):
        print(f"  pos {pos:2d}: " + "  ".join(f"{i:3d}: {p:.3f}" for i, p in zip(ids, ps)))
    Path(out_dir).mkdir(exist_ok=True)
