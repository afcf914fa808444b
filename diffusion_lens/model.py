"""`HookedDiffusionTransformer`: the hookable core plus denoising and checkpoints, the class users load.

The layers meet here and nowhere else: `core` (the forward and its hook points), `denoising`
(samplers and the `generate` driver), `checkpoints` + `model_adapters` (the families' formats).
Importing this module registers every shipped family (`import model_adapters`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

import model_adapters  # noqa: F401  (registers the shipped families with `diffusion_lens.checkpoints`)
from diffusion_lens.checkpoints.loading import load_pretrained, save_pretrained
from diffusion_lens.core.model import HookedDiffusionCore, NamesFilter
from diffusion_lens.denoising.generate import estimate_cache_bytes, generate, run_with_step_cache


class HookedDiffusionTransformer(HookedDiffusionCore):
    """A masked-diffusion language model with a TransformerLens hook point on every activation,
    denoising-step aware (`generate`, `run_with_cache(step=)`) and loadable from its family's checkpoints.

    The forward, hooks, caches, weight views and tokens are `HookedDiffusionCore`'s (diffusion_lens.core.model).

    Example:
        >>> model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
        >>> logits, cache = model.run_with_cache("Hello", names_filter="blocks.0.hook_resid_post")
        >>> cache["blocks.0.hook_resid_post"].shape  # [batch pos d_model]
    """

    def run_with_cache(
        self,
        *model_args,
        names_filter: NamesFilter = None,
        device: Optional[Union[str, torch.device]] = None,
        remove_batch_dim: bool = False,
        step: Optional[Union[int, Sequence[int]]] = None,
        incl_bwd: bool = False,
        **model_kwargs,
    ):
        """`HookedDiffusionCore.run_with_cache`, or with `step=` the forward of a denoising step.

        With `step=k` the input is a prompt: the sampler runs up to denoising step k (negative =
        from the end of the run: `step=-1` is the last) and the forward *at* step k is returned as
        (logits, ActivationCache); `step=[k, ...]` returns ({step: logits}, StepCache). Extra
        keywords then go to `generate` (steps, gen_length, ...); see
        `diffusion_lens.denoising.run_with_step_cache`. A forward that computes a window of the
        canvas (a KV cache, DiffusionGemma's passes) holds those columns only: `cache.positions`.

        Example:
            >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
            >>> logits, cache = model.run_with_cache(prompt, step=3, steps=8, gen_length=16, block_length=8)
            >>> _, cache = gemma.run_with_cache(prompt, step=1, max_new_tokens=32, seed=0)  # 1st decoder step
            >>> cache.positions                                      # its canvas columns [P, P + canvas_length)
        """
        if step is None:
            return super().run_with_cache(
                *model_args, names_filter=names_filter, device=device, remove_batch_dim=remove_batch_dim,
                incl_bwd=incl_bwd, **model_kwargs,
            )
        if incl_bwd:
            raise ValueError("incl_bwd=True needs a plain forward; step= replays generate, which runs without gradients.")
        return run_with_step_cache(
            self, *model_args, step=step, names_filter=names_filter, device=device,
            remove_batch_dim=remove_batch_dim, **model_kwargs,
        )

    # `diffusion_lens.denoising.generate` / `estimate_cache_bytes` as methods: one signature, so
    # `inspect.signature(model.generate)` lists the driver options (`DRIVER_OPTIONS`) and
    # `help(model.generate)` shows the driver's docstring; sampler options pass through **sampler_options.
    generate = generate
    estimate_cache_bytes = estimate_cache_bytes

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, Path],
        *,
        dtype: Union[torch.dtype, str, None] = None,
        device: Union[str, torch.device, None] = None,
        device_map: Union[str, dict[str, Union[str, int, torch.device]], None] = None,
        max_memory: Optional[dict[Union[int, str], Union[int, str]]] = None,
        offload_folder: Union[str, Path, None] = None,
        adapter: Optional[str] = None,
        revision: Optional[str] = None,
    ) -> "HookedDiffusionTransformer":
        """Load a checkpoint: an embedded name ("tiny-refusal"), a local folder or a hub id.

        Weights are read shard by shard straight into `dtype` (a torch.dtype or a name such as
        "bfloat16"; default: the checkpoint's dtype) on `device` (default "cpu"), so peak memory stays
        near one copy. Files, config.json and key names are checked first (docs/installation.md,
        "Checks at load time"). The family adapter is detected from config.json or forced with
        `adapter=`. No code from the checkpoint folder is ever run.

        A model too big for one device is spread with `device_map=` (instead of `device=`), through
        accelerate's big-model machinery (docs/scale.md): a dict of module name -> device in
        accelerate's convention ({"embed": 0, "blocks.0": 0, ..., "blocks.31": 1, "ln_final": 1,
        "unembed": 1}; a device is a GPU index, "cuda:1", "cpu" or "disk"), or "auto" / "balanced" /
        "balanced_low_0" / "sequential", which size blocks against `max_memory` ({0: "20GiB",
        "cpu": "60GiB"}; default: what is free) and never split a block. Each tensor still streams from
        its shard to its module's device; "disk" modules are written to `offload_folder` (a new or empty
        folder) and read back at each use. Hooks, `hook.state`, `generate` and steering work unchanged:
        a hook sees its block's activation on that block's device. The map is `model.hf_device_map`.

        Example:
            >>> model = HookedDiffusionTransformer.from_pretrained("GSAI-ML/LLaDA-8B-Instruct",
            ...                                                    dtype=torch.bfloat16, device="cuda")
            >>> big = HookedDiffusionTransformer.from_pretrained("inclusionAI/LLaDA2.0-flash", dtype="bfloat16",
            ...                                                  device_map="auto", max_memory={0: "70GiB", 1: "70GiB"})
            >>> big.hf_device_map["blocks.0"], big.hf_device_map["unembed"]   # (0, 1)
        """
        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_folder, adapter=adapter, revision=revision)

    def save_pretrained(self, path: Union[str, Path], *, max_shard_bytes: int = 4 * 2**30) -> Path:
        """Write the model in its family's original checkpoint format (config.json, safetensors,
        tokenizer files), loadable by upstream code and by `from_pretrained`."""
        return save_pretrained(self, path, max_shard_bytes=max_shard_bytes)
