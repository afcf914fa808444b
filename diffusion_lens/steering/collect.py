"""Activations of every prompt at chosen sites and positions of one denoising forward, through `generate`.

Each batch is one `generate` run, so readers see the same `hook.state` as any other hook, and the
user's `hooks` (e.g. `ablate(...)`) are installed by the same door as in a generation. On a model
with one pass the forward read is step 0 of `CanvasProbe` (the canvas every sampler starts from:
the left-padded prompt + `gen_length` masks, one forward). On a model that runs its weights in
several passes (DiffusionGemma: a causal "encoder" over the prompt, a "decoder" over a noise canvas
reading the prompt's KV cache; `cfg.layer_scalar_passes`) it is a forward of the family's own
sampler (`Reading`), so the state, the window and the KV cache are exactly generate's. The run ends
after the forward read, and that forward after the last block read (`stop_after_sites`).

Families with a logit shift (Dream) read the *prediction* for position j at residual position
j-1; positions here are residual positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from diffusion_lens.denoising import DEFAULT_SEED, Sampler, generate
from diffusion_lens.denoising import hooks as H
from diffusion_lens.denoising.generate import split_generate_kwargs
from diffusion_lens.denoising.samplers import CanvasProbe
from diffusion_lens.prompts.batching import PromptsInput, batch_indices, left_pad, prepare_prompts
from diffusion_lens.steering.positions import PositionSpec, check_positions, parse_positions, selector


class StopForward(Exception):
    """Raised by the hooks of `stop_after_sites` / `Reading.hooks` once every requested activation is read."""


def _stop(act, hook):
    raise StopForward


def stop_after_sites(model, sites: Sequence[str], step: Optional[int] = 0, pass_name: Optional[str] = None) -> list:
    """A hook that ends the forward of `step` (None: the first forward in `pass_name`) after the last
    block that `sites` read (saves the later layers); none when a site is outside the blocks or in
    the last block. Catch `StopForward`.

    Example:
        >>> try:
        ...     generate(model, tokens, sampler=CanvasProbe(8), hooks=readers + stop_after_sites(model, sites))
        ... except StopForward:
        ...     pass
    """
    layers = [int(s.split(".")[1]) for s in sites if s.startswith("blocks.")]
    if len(layers) != len(sites) or max(layers) + 1 >= model.cfg.n_layers:
        return []
    return [H.at(f"blocks.{max(layers) + 1}.hook_resid_pre", _stop, steps=step, passes=pass_name)]


@dataclass(frozen=True)
class Reading:
    """Which forward a reader reads: the run (`sampler` and generate's `driver` options), its global
    `step` (None: the run's first forward in `pass_name`) and the pass it must run.

    Why: one rule for `collect_activations`, `mean_difference` and `fit_transport`. On a multi-pass
    model every prompt's run starts from one noise canvas drawn from `seed` (the sampler's starting
    canvas, `decoder_input_ids`), so a prompt reads the same values alone or in any batch, and a
    single prompt reads exactly what `generate(prompt, seed=seed)` computes.

    Example:
        >>> reading = Reading.plan(gemma, pass_name="decoder", step=0, gen_length=16, generate_kwargs=None)
        >>> reading.step, reading.pass_name    # (None, 'decoder'): the first decoder forward
    """

    sampler: Sampler
    driver: dict
    step: Optional[int]
    pass_name: Optional[str]

    @classmethod
    def plan(cls, model, *, pass_name: Optional[str], step: int, gen_length: int,
             generate_kwargs: Optional[dict], seed: Optional[int] = None) -> "Reading":
        """The reading of `step` (0 with a `pass_name`: that pass's first forward) in the run that
        `generate_kwargs` describes (none at step 0: `CanvasProbe(gen_length)` on a one-pass model,
        the family's sampler with `gen_length` on a multi-pass one). `seed` (else generate_kwargs'
        seed, else `DEFAULT_SEED`) draws a multi-pass model's noise canvas."""
        passes = model.cfg.layer_scalar_passes
        if pass_name is not None and pass_name not in passes:
            runs = f"runs the passes {passes}" if passes else "runs one pass: leave pass_name=None"
            raise ValueError(f"pass_name={pass_name!r}: this model {runs}.")
        if seed is not None and not passes:
            raise ValueError("seed= draws the noise canvas of a multi-pass model (DiffusionGemma's decoder); this model "
                             "reads a mask canvas, which has no draws. Drop seed=.")
        options = dict(generate_kwargs or {})
        if step == 0 and not options:
            if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 0:
                raise ValueError(f"gen_length must be an int >= 0; got {gen_length!r}.")
            if not passes:
                return cls(CanvasProbe(gen_length=gen_length), {}, 0, None)
            options = {"gen_length": gen_length}
        sampler, driver = split_generate_kwargs(model, options)
        if step >= sampler.n_steps():
            raise ValueError(f"step={step} but the sampler runs {sampler.n_steps()} steps (0..{sampler.n_steps() - 1}).")
        if passes:
            seed = driver.get("seed", DEFAULT_SEED) if seed is None else seed
            if "generator" not in driver:
                driver["seed"] = seed
            if sampler.options().get("decoder_input_ids") is None:
                width = sampler.response_length() // sampler.n_blocks()
                noise = torch.randint(0, model.cfg.d_vocab, (1, width), generator=torch.Generator().manual_seed(seed))
                sampler = sampler.with_options(decoder_input_ids=noise)
        return cls(sampler, driver, None if (step == 0 and pass_name is not None) else step, pass_name)

    def hooks(self, model, sites: Sequence[str]) -> list:
        """Hooks that check the pass of the step read, end the run after the forward read (that forward
        after its last block read, else at the start of the next forward) and raise `StopForward`."""
        out = []
        if self.step is not None and self.pass_name is not None:
            def check(act, hook, step=self.step, wanted=self.pass_name):
                if hook.pass_name != wanted:
                    raise ValueError(f"Step {step} runs the {hook.pass_name!r} pass, not pass_name={wanted!r}; read a "
                                     f"step of that pass (record=True shows each step's state.pass_name), or step=0 "
                                     f"for its first forward.")
            out.append(H.at(sites[0], check, steps=self.step))
        out += stop_after_sites(model, sites, self.step, self.pass_name)
        if self.step is None:
            read = []

            def mark(act, hook):
                read.append(hook.state.step)

            def stop_next(act, hook):
                if read:
                    raise StopForward

            out += [H.at(sites[0], mark, passes=self.pass_name), ("hook_embed", stop_next)]
        return out

    def generate(self, model, tokens: Int[Tensor, "batch pos"], mask: Optional[Int[Tensor, "batch pos"]], hooks: list,
                 reducers: Sequence = ()) -> None:
        """One `generate` run of a batch up to the forward read (`StopForward` caught)."""
        try:
            generate(model, tokens, attention_mask=mask, sampler=self.sampler, reducers=reducers, hooks=hooks,
                     stop_after=self.step, return_trajectory=False, progress=False, **self.driver)
        except StopForward:
            pass


def _check_site_shape(act: Tensor, state, name: str) -> None:
    width = len(range(state.n_pos)[state.computed])
    if act.ndim < 2 or act.shape[1] != width or act.shape[0] < state.batch:
        raise ValueError(
            f"Hook point {name} has activations of shape {tuple(act.shape)}, not [batch pos ...] = "
            f"{(state.batch, width)}; per-position activations are needed (expert hooks hold routed tokens only)."
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
    pass_name: Optional[str] = None,
    seed: Optional[int] = None,
) -> dict[str, Tensor]:
    """Activations of every prompt at `sites` in one denoising forward (float64, on the model's device).

    `pooling` takes the selectors of `diffusion_lens.steering.positions` ("last_prompt",
    "prompt[-k]", "response[i]", a list of those, "pre_instruction" / "post_instruction",
    "mean_prompt" / "mean_response" / "mean_all") or None. Shapes per site: pooled name ->
    [n *feat]; named positions -> [n n_sel *feat]; None -> [n_positions *feat] (every non-pad
    position the forward computes, of every prompt, rows in order). Memory grows with n: for means
    over many prompts use `mean_difference` (streaming).

    The forward read: on a one-pass model, the step-0 canvas (prompt + `gen_length` masks). On a
    multi-pass model (`cfg.layer_scalar_passes`, DiffusionGemma) `pass_name` picks it: "encoder"
    (and None, the default pass) reads the causal pass over the prompt (prompt positions only;
    it equals `model.run_with_cache(prompt, pass_name="encoder")`), "decoder" the first denoising
    step over a noise canvas drawn from `seed` (default 0; the same canvas for every prompt)
    reading the prompt's KV cache (canvas positions "response[i]" / "mean_response" only). A
    position the pass does not compute is an error.

    Example:
        >>> acts = collect_activations(model, prompts, sites=["blocks.1.hook_mlp_out"], pooling="last_prompt")
        >>> acts["blocks.1.hook_mlp_out"].shape        # [n 1 d_model]
        >>> canvas = collect_activations(gemma, prompts, sites=["blocks.1.hook_resid_post"], pooling="mean_response",
        ...                              pass_name="decoder", seed=0)
    """
    positions = parse_positions(pooling, argument="pooling", allow_every=True)
    prepared = prepare_prompts(model, prompts, chat=chat)
    check_positions(positions, prepared, argument="pooling")
    sites = list(sites)
    if not sites:
        raise ValueError("sites is empty; pass at least one hook point name.")
    model.check_hook_names(sites)
    reading = Reading.plan(model, pass_name=pass_name, step=0, gen_length=gen_length, generate_kwargs=None, seed=seed)
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

        readers = [H.at(site, read, steps=reading.step, passes=reading.pass_name) for site in sites]
        reading.generate(model, tokens, mask, [list(hooks), reading.hooks(model, sites), readers])
    missing = [s for s in sites if any(p is None for p in per_prompt[s])]
    if missing:
        raise RuntimeError(f"Hook points {missing} did not fire during the forward.")
    join = torch.cat if positions.kind == "every" else torch.stack
    return {site: join(parts) for site, parts in per_prompt.items()}


__all__ = ["Reading", "StopForward", "collect_activations", "stop_after_sites"]
