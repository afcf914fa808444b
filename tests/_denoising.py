"""Shared helpers for the denoising tests (generate, step hooks, step caches)."""

import json
from functools import lru_cache

import torch
from safetensors import safe_open

from diffusion_lens import HookedDiffusionTransformer
from tests.conftest import FIXTURES

LLADA_FIXTURES = ["llada-tiny-mha", "llada-tiny-gqa"]
RUNS = ["gen_semi_ar", "gen_one_block", "gen_cfg", "gen_padded", "gen_logits_eos_inf",
        "gen_conf_eos_eot_inf", "gen_conf_eos_eot_inf_sampled", "gen_sampled"]


@lru_cache(maxsize=None)
def load_model(name: str) -> HookedDiffusionTransformer:
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / name)


@lru_cache(maxsize=None)
def golden_run(name: str, run: str) -> dict:
    """prompt, attention_mask (or None), output, trajectory, kwargs (seed popped), seed, mask_id."""
    with safe_open(FIXTURES / name / "golden_generate.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        kwargs = json.loads(meta[f"{run}.kwargs"])
        return {
            "prompt": f.get_tensor(f"{run}.prompt"),
            "attention_mask": f.get_tensor(f"{run}.attention_mask") if f"{run}.attention_mask" in keys else None,
            "output": f.get_tensor(f"{run}.output"),
            "trajectory": f.get_tensor(f"{run}.trajectory"),
            "seed": kwargs.pop("seed", None),
            "kwargs": kwargs,
            "mask_id": int(meta["mask_id"]),
        }


def mask_entering(golden: dict, step: int) -> torch.Tensor:
    """[batch pos] bool: the mask of the canvas entering `step` (before its forward)."""
    if step == 0:
        prompt = golden["prompt"]
        gen = golden["output"].shape[1] - prompt.shape[1]
        canvas = torch.cat([prompt, torch.full((prompt.shape[0], gen), golden["mask_id"])], 1)
    else:
        canvas = golden["trajectory"][step - 1]
    return canvas == golden["mask_id"]


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


def all_states_none(model) -> bool:
    return all(hp.state is None for hp in model.hook_dict.values())
