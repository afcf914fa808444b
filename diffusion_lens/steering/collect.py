"""Activations of every prompt at chosen sites and positions of the step-0 canvas, through `generate`.

Each batch is one `generate` run with `CanvasProbe` (the canvas every sampler starts from: the
left-padded prompt + `gen_length` masks, one forward) and `stop_after=0`, so readers see the same
`hook.state` as any other hook, and the user's `hooks` (e.g. `ablate(...)`) are installed by the
same door as in a generation. The forward ends after the last block read (`stop_after_sites`).

Families with a logit shift (Dream) read the *prediction* for position j at residual position
j-1; positions here are residual positions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from diffusion_lens.denoising import generate
from diffusion_lens.denoising import hooks as H
from diffusion_lens.denoising.samplers import CanvasProbe
from diffusion_lens.prompts.batching import PromptsInput, batch_indices, left_pad, prepare_prompts
from diffusion_lens.steering.positions import PositionSpec, check_positions, parse_positions, selector


class StopForward(Exception):
    """Raised by the hook of `stop_after_sites` once every requested activation is read."""


def stop_after_sites(model, sites: Sequence[str], step: int = 0) -> list:
    """A hook that ends the forward of `step` after the last block that `sites` read (saves the later
    layers); none when a site is outside the blocks or in the last block. Catch `StopForward`.

    Example:
        >>> try:
        ...     generate(model, tokens, sampler=CanvasProbe(8), hooks=readers + stop_after_sites(model, sites))
        ... except StopForward:
        ...     pass
    """
    layers = [int(s.split(".")[1]) for s in sites if s.startswith("blocks.")]
    if len(layers) != len(sites) or max(layers) + 1 >= model.cfg.n_layers:
        return []

    def stop(act, hook):
        raise StopForward

    return [H.at(f"blocks.{max(layers) + 1}.hook_resid_pre", stop, steps=step)]


def _check_site_shape(act: Tensor, state, name: str) -> None:
    if act.ndim < 2 or act.shape[1] != state.n_pos or act.shape[0] < state.batch:
        raise ValueError(
            f"Hook point {name} has activations of shape {tuple(act.shape)}, not [batch pos ...] = "
            f"{(state.batch, state.n_pos)}; per-position activations are needed (expert hooks hold routed tokens only)."
        )


def collect_activations(
    model,
    prompts: PromptsInput,
    *,
    sites: Sequence[str],
    pooling: PositionSpec = "mean_all",
    gen_length: int = 128,
    batch_size: int = 16,
    chat: Optional[bool] = None,
    hooks: Sequence = (),
) -> dict[str, Tensor]:
    """Activations of every prompt at `sites` on the step-0 canvas (float64, on the model's device).

    `pooling` takes the selectors of `diffusion_lens.steering.positions` ("last_prompt",
    "prompt[-k]", "response[i]", a list of those, "pre_instruction" / "post_instruction",
    "mean_prompt" / "mean_response" / "mean_all") or None. Shapes per site: pooled name ->
    [n *feat]; named positions -> [n n_sel *feat]; None -> [n_positions *feat] (every non-pad
    position of every prompt, rows in order). Memory grows with n: for means over many prompts use
    `mean_difference` (streaming).

    Example:
        >>> acts = collect_activations(model, prompts, sites=["blocks.1.hook_mlp_out"], pooling="last_prompt")
        >>> acts["blocks.1.hook_mlp_out"].shape        # [n 1 d_model]
    """
    positions = parse_positions(pooling, argument="pooling", allow_every=True)
    prepared = prepare_prompts(model, prompts, chat=chat)
    check_positions(positions, prepared, argument="pooling")
    sites = list(sites)
    if not sites:
        raise ValueError("sites is empty; pass at least one hook point name.")
    model.check_hook_names(sites)
    probe = CanvasProbe(gen_length=gen_length)
    per_prompt: dict[str, list] = {s: [None] * len(prepared) for s in sites}
    for indices in batch_indices(model, prepared, batch_size):
        tokens, mask, _ = left_pad(model, [prepared.tokens[i] for i in indices])

        def read(act, hook, indices=indices):
            state = hook.state
            _check_site_shape(act, state, hook.name)
            chosen = selector(positions, state, prepared.template, indices)
            values = chosen.read(act[: state.batch])
            # every valid (row, position) is a sample: split the rows back
            pieces = values.split(chosen.valid.sum(1).tolist()) if positions.kind == "every" else values.unbind(0)
            for i, piece in zip(indices, pieces):
                per_prompt[hook.name][i] = piece

        try:
            generate(model, tokens, attention_mask=mask, sampler=probe, stop_after=0, return_trajectory=False,
                     progress=False, hooks=[list(hooks), [(site, read) for site in sites],
                                            stop_after_sites(model, sites)])
        except StopForward:
            pass
    missing = [s for s in sites if any(p is None for p in per_prompt[s])]
    if missing:
        raise RuntimeError(f"Hook points {missing} did not fire during the forward.")
    join = torch.cat if positions.kind == "every" else torch.stack
    return {site: join(parts) for site, parts in per_prompt.items()}


__all__ = ["StopForward", "collect_activations", "stop_after_sites"]
