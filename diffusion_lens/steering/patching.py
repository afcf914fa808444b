"""Activation patching across denoising steps.

Two aligned replays of the same denoising process are compared:

* ``mode="generate"``: the clean and the corrupted prompt are generated with the same seed (so
  the same random numbers); in each patched run the corrupted generation runs freely and, at the
  chosen step(s) and position(s), one hook point's activation is replaced by the clean run's.
  `metric(out)` reads the patched run's `GenerationOutput`.
* ``mode="teacher_forced"``: every forward runs on the clean run's canvases with the corrupted
  prompt written in (`model.generate(corrupt, replay=clean)`), so the inputs stay aligned at every step whatever
  is patched; `metric(logits)` reads {step: per-token logits [batch pos vocab]} of all steps.

Effects are `metric(patched) - metric(corrupted)`, shaped [name step pos] over the requested
hook names, step groups and position groups. Patching every clean activation of a hook point
that carries the whole input (e.g. `hook_embed` at every step and position) reproduces the
clean run exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.results_io import load_result, save_result
from diffusion_lens.denoising import hooks as H
from diffusion_lens.denoising.generate import split_generate_kwargs
from diffusion_lens.prompts.batching import PromptsInput, prepare_prompts
from diffusion_lens.prompts.distributed import check_batch_draws, gather_records, my_batches
from diffusion_lens.steering._common import progress_bar, require_pandas

StepGroup = Union[int, range, Sequence[int]]


@dataclass
class PatchingResult:
    """`effects` [name step pos] = metric(patched) - metric(corrupted), with the labels of each axis
    and the clean / corrupted metric values.

    Example:
        >>> res = patch_across_steps(model, clean, corrupt, names=names, metric=m, generate_kwargs=opts)
        >>> res.effects.shape, res.clean, res.corrupted
    """

    effects: Float[Tensor, "name step pos"]
    names: list[str]
    steps: list
    positions: list
    clean: float
    corrupted: float
    mode: str

    def to_pandas(self):
        """One row per (name, step group, position group) with its effect.

        Example:
            >>> res.to_pandas().sort_values("effect").tail()
        """
        pd = require_pandas("PatchingResult.to_pandas()")
        return pd.DataFrame([
            {"name": name, "step": step, "position": pos, "effect": float(self.effects[i, j, k])}
            for i, name in enumerate(self.names) for j, step in enumerate(self.steps)
            for k, pos in enumerate(self.positions)
        ])

    def save(self, path) -> Path:
        """Write to the folder `path` (safetensors + JSON, no pickle; see `diffusion_lens.core.results_io`).

        Example:
            >>> res.save("runs/patching")
            >>> PatchingResult.load("runs/patching").effects.shape
        """
        meta = {"names": self.names, "steps": self.steps, "positions": self.positions, "clean": self.clean,
                "corrupted": self.corrupted, "mode": self.mode}
        return save_result(path, "PatchingResult", {"effects": self.effects}, meta)

    @classmethod
    def load(cls, path) -> "PatchingResult":
        """Read a result written by `PatchingResult.save` (step / position labels keep their types).

        Example:
            >>> res = PatchingResult.load("runs/patching")
        """
        tensors, meta = load_result(path, "PatchingResult")
        return cls(effects=tensors["effects"], **meta)


def _as_groups(groups, n: Optional[int], what: str) -> list:
    if groups is None:
        if n is None:
            return [None]
        return [[i] for i in range(n)]
    if isinstance(groups, (int, range)) and not isinstance(groups, bool):
        groups = [groups]
    out = []
    for g in groups:
        if isinstance(g, bool):
            raise TypeError(f"{what} groups must be ints, ranges, lists of ints or scope names; got {g!r}.")
        if isinstance(g, int):
            out.append([g])
        elif isinstance(g, str) or g is None:
            out.append(g)
        else:
            out.append(list(g))
    return out


def _label(group) -> Any:
    if group is None:
        return "all"
    if isinstance(group, str):
        return group
    if len(group) == 1:
        return group[0]
    contiguous = list(range(group[0], group[-1] + 1)) == list(group)
    return f"{group[0]}-{group[-1]}" if contiguous else tuple(group)


def _scalar(value) -> float:
    t = torch.as_tensor(value, dtype=torch.float64)
    return float(t.mean())


def _aligned_tokens(model, clean, corrupt, chat):
    a, b = prepare_prompts(model, clean, chat=chat, argument="clean"), prepare_prompts(model, corrupt, chat=chat, argument="corrupt")
    if len(a) != len(b):
        raise ValueError(f"clean has {len(a)} prompts, corrupt {len(b)}; they must pair up.")
    bad = [i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x.numel() != y.numel()]
    if bad:
        raise ValueError(f"Prompt pairs {bad[:10]} have different token lengths; patching needs aligned positions.")
    lengths = {t.numel() for t in a.tokens}
    if len(lengths) != 1:
        raise ValueError("All prompts must have the same token length (no padding) so positions align; got "
                         f"lengths {sorted(lengths)}.")
    device = model.W_E.device
    return torch.stack(a.tokens).to(device), torch.stack(b.tokens).to(device)


def patch_across_steps(
    model,
    clean: PromptsInput,
    corrupt: PromptsInput,
    *,
    names: Sequence[str],
    metric: Callable,
    steps: Optional[Sequence[StepGroup]] = None,
    positions: Optional[Sequence[Any]] = None,
    mode: str = "generate",
    chat: Optional[bool] = None,
    generate_kwargs: Optional[dict] = None,
    progress: bool = True,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one (hook name, step group, position group) at a time.

    `names`: hook points with [batch pos ...] activations. `steps`: step groups (an int, a range
    or a list each; default: every step on its own). `positions`: position groups (an int / list of
    canvas columns, negative from the end, or a scope name such as "prompt" / "response";
    default: [None] = all positions at once). Clean and corrupted prompts must pair up and have
    the same token length. `generate_kwargs`: sampler options and seed (default seed 0: both runs
    draw the same random numbers). See the module docstring for the two modes and `metric`.
    `progress=False` turns off the bar over patched runs.

    Inside a `torch.distributed` process group (torchrun, accelerate launch) the patched runs are
    shared round-robin over the ranks (every rank first runs the clean and corrupted ones: the prompts
    form one batch, which is never split) and the effects are gathered: every rank returns the
    one-process result bit for bit (each run draws from `seed`, never from an earlier run).

    Example:
        >>> opts = dict(steps=16, gen_length=16, block_length=8)
        >>> m = lambda out: (out.responses == target).float().mean()
        >>> res = patch_across_steps(model, clean, corrupt, names=["blocks.3.hook_resid_pre"], metric=m,
        ...                          positions=[[-1], "response"], generate_kwargs=opts)
    """
    if mode not in ("generate", "teacher_forced"):
        raise ValueError(f"mode must be 'generate' or 'teacher_forced'; got {mode!r}.")
    if not callable(metric):
        raise TypeError(f"metric must be callable; got {type(metric).__name__}.")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("names is empty; pass at least one hook point.")
    model.check_hook_names(names)
    options = {"seed": 0, **(generate_kwargs or {})}
    sampler, driver = split_generate_kwargs(model, options)
    for reserved in ("hooks", "cache", "reducers"):
        if reserved in driver:
            raise ValueError(f"generate_kwargs may not set {reserved!r} here.")
    check_batch_draws(sampler.stochastic(), driver, "patch_across_steps")
    clean_tokens, corrupt_tokens = _aligned_tokens(model, clean, corrupt, chat)
    n_steps = sampler.n_steps()
    step_groups = _as_groups(steps, n_steps, "steps")
    pos_groups = _as_groups(positions, None, "positions")
    bad = sorted({s for g in step_groups for s in g if not 0 <= s < n_steps})
    if bad:
        raise ValueError(f"steps {bad} are outside 0..{n_steps - 1}.")
    all_steps = sorted({s for g in step_groups for s in g})
    cache_request = dict(names=names, steps=all_steps, positions="all")
    batch = clean_tokens.shape[0]

    def patcher(name, source):
        def fn(act, hook):
            clean_act = source[hook.state.step][name].to(act.device, act.dtype)
            out = act.clone()
            out[:batch] = clean_act
            return out

        return fn

    if mode == "generate":
        def run(tokens, hooks=(), cache=None):
            return model.generate(tokens, hooks=list(hooks), cache=cache, sampler=sampler,
                                  **{"progress": False, **driver})

        clean_out = run(clean_tokens, cache=cache_request)
        source = clean_out.cache
        clean_value = _scalar(metric(clean_out))
        corrupted = _scalar(metric(run(corrupt_tokens)))

        def patched(hook) -> float:
            return _scalar(metric(run(corrupt_tokens, hooks=[hook])))
    else:
        every_step = list(range(n_steps))

        def token_logits(out):
            return {s: model.token_logits(t) for s, t in out.logits.items()}

        def replay_corrupt(hooks=()):  # the clean canvases with the corrupt prompt written in
            return token_logits(model.generate(corrupt_tokens, replay=recorded, hooks=list(hooks), progress=False,
                                               return_trajectory=False, capture_logits=every_step))

        recorded = model.generate(clean_tokens, sampler=sampler, cache=cache_request, record=True,
                                  capture_logits=every_step, **{"progress": False, **driver})
        source = recorded.cache
        clean_value = _scalar(metric(token_logits(recorded)))
        corrupted = _scalar(metric(replay_corrupt()))

        def patched(hook) -> float:
            return _scalar(metric(replay_corrupt([hook])))

    # one work item per patched run (each self-seeded, so independent of the others): each rank runs its
    # share after its own clean and corrupted runs (`sharded_map`), the effects are gathered in order
    cells = [(name, group, pos) for name in names for group in step_groups for pos in pos_groups]
    mine = my_batches(cells)
    bar = progress_bar(len(mine), "patch_across_steps", progress)
    values = []
    for _, (name, group, pos) in mine:
        hook = H.at(name, patcher(name, source), steps=group, positions=pos, guidance="conditional")
        values.append(patched(hook) - corrupted)
        bar.update()
    bar.close()
    effects = torch.tensor(gather_records(values, [k for k, _ in mine]), dtype=torch.float64).reshape(
        len(names), len(step_groups), len(pos_groups))
    return PatchingResult(effects, names, [_label(g) for g in step_groups], [_label(p) for p in pos_groups],
                          clean_value, corrupted, mode)


__all__ = ["PatchingResult", "patch_across_steps"]
