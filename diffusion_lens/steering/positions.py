"""Which positions of the step-s canvas an analysis reads: one vocabulary of named selectors.

The canvas is [left pads | prompt | response]; every name below picks columns of it, in every row,
whatever the row's padding:

* "last_prompt": the last prompt token; "prompt[-k]" (k >= 1): the k-th prompt token from the end
  ("prompt[-1]" is "last_prompt"); "response[i]" (i >= 0): the i-th response position. A list of
  these names reads several positions.
* "pre_instruction" / "post_instruction": the chat-template tokens before / after the user's text
  (`diffusion_lens.prompts.instruction_template`; string prompts only).
* "mean_prompt" / "mean_response" / "mean_all": the mean over the real prompt tokens, the response
  positions, or both (pads excluded); one pooled position.
* None (only in `collect_activations`): every non-pad position as its own sample.

A forward that computes only a window of the canvas (`hook.state.computed`: a KV cache, or one of
DiffusionGemma's passes, whose "encoder" computes the prompt and whose "decoder" computes the noise
canvas) is read at the positions it computes: a selector naming a column outside the window is an
error that says which columns the forward computes, and "mean_response" pools the response columns
it computes (the decoder's canvas block).

Bare ints used to count from the prompt / response boundary (-1 = last prompt token) while
everywhere else (`ablate`, `add`, `H.at`, caches) an int is a canvas column; that meaning is
deprecated (one release, `DeprecationWarning` naming the selector to write) and ints will become
canvas columns here too.

Example:
    >>> mean_difference(model, harmful, harmless, positions="last_prompt")
    >>> collect_activations(model, prompts, sites=sites, positions=["prompt[-2]", "response[0]"])
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.prompts.batching import PreparedPrompts
from diffusion_lens.prompts.templates import InstructionTemplate

POOLED = ("mean_prompt", "mean_response", "mean_all")
TEMPLATE = ("pre_instruction", "post_instruction")
_OFFSET_NAME = re.compile(r"(prompt|response)\[(-?\d+)\]")


@dataclass(frozen=True)
class Positions:
    """A checked position choice: `kind` is "offsets" (columns counted from the prompt / response
    boundary, -1 = last prompt token, with their `labels`), a template or pooled name, or "every".

    Example:
        >>> parse_positions(["prompt[-2]", "last_prompt"])
        Positions(kind='offsets', offsets=(-2, -1), labels=('prompt[-2]', 'last_prompt'))
    """

    kind: str
    offsets: tuple[int, ...] = ()
    labels: tuple = ()

    def position_labels(self, template: Optional[InstructionTemplate]) -> list:
        """One label per selected position (what `Directions.positions` holds)."""
        if self.kind == "offsets":
            return list(self.labels)
        if self.kind == "pre_instruction":
            return [f"pre_instruction[{i}]" for i in range(len(template.prefix))]
        if self.kind == "post_instruction":
            n = len(template.suffix)
            return [f"post_instruction[{i - n}]" for i in range(n)]
        return [self.kind]

    def template_tokens(self, template: InstructionTemplate) -> list[int]:
        return template.prefix if self.kind == "pre_instruction" else template.suffix


#: What a `positions=` argument takes (a parsed `Positions` passes through; ints are deprecated).
PositionSpec = Union[str, Sequence[str], None, Positions, int, Sequence[int]]


def selector_name(offset: int) -> str:
    """The selector that names a boundary offset: -1 -> "last_prompt", -k -> "prompt[-k]", i -> "response[i]".

    Example:
        >>> selector_name(-1), selector_name(-3), selector_name(0)
        ('last_prompt', 'prompt[-3]', 'response[0]')
    """
    return "last_prompt" if offset == -1 else (f"prompt[{offset}]" if offset < 0 else f"response[{offset}]")


def _offset_of(name: str) -> Optional[int]:
    if name == "last_prompt":
        return -1
    match = _OFFSET_NAME.fullmatch(name)
    if match is None:
        return None
    value = int(match.group(2))
    if match.group(1) == "prompt":
        return value if value < 0 else None
    return value if value >= 0 else None


def _unknown(spec, argument: str) -> ValueError:
    return ValueError(
        f"Unknown {argument}={spec!r}; expected 'last_prompt', 'prompt[-k]' (k >= 1), 'response[i]' (i >= 0), a list of "
        f"those, or one of {TEMPLATE + POOLED}."
    )


def parse_positions(spec: PositionSpec, *, argument: str = "positions", allow_every: bool = False) -> Positions:
    """Check a position spec and return its `Positions`; the deprecated int spelling warns, pointing
    at the first caller outside diffusion_lens (so the user's line is shown, however deep the call).

    Example:
        >>> parse_positions("post_instruction").kind
        'post_instruction'
        >>> parse_positions(-1).labels          # DeprecationWarning: write positions='last_prompt'
        (-1,)
    """
    if isinstance(spec, Positions):
        return spec
    if spec is None:
        if not allow_every:
            raise ValueError(f"{argument}=None is not allowed here; pass a named selector such as 'last_prompt'.")
        return Positions("every")
    if isinstance(spec, str):
        if spec in POOLED or spec in TEMPLATE:
            return Positions(spec)
        offset = _offset_of(spec)
        if offset is None:
            raise _unknown(spec, argument)
        return Positions("offsets", (offset,), (spec,))
    values = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{argument} must be a selector name or a list of them; got {spec!r}.") from None
    if not values:
        raise ValueError(f"{argument} is an empty list; name at least one position, e.g. ['last_prompt'].")
    if all(isinstance(v, str) for v in values):
        offsets = [_offset_of(v) for v in values]
        if any(o is None for o in offsets):
            raise _unknown([v for v, o in zip(values, offsets) if o is None][0], argument)
        return Positions("offsets", tuple(offsets), tuple(values))
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"{argument} must be a selector name or a list of them; got {spec!r}.")
    names = [selector_name(v) for v in values]
    instead = repr(names[0]) if isinstance(spec, int) else repr(names)
    _warn_at_caller(
        f"diffusion_lens: {argument}={spec!r} counts from the prompt / response boundary; this int meaning is deprecated "
        f"(ints will be canvas columns, as in ablate / add / H.at). Write {argument}={instead} instead."
    )
    return Positions("offsets", tuple(values), tuple(values))


def _warn_at_caller(message: str) -> None:
    """A DeprecationWarning attributed to the first frame outside this package and its type-checking
    wrappers (jaxtyping / beartype), so the user's line is shown however deep the call."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
        frame = frame.f_back
    if frame is None:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return
    module = frame.f_globals.get("__name__", "__main__")
    registry = frame.f_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno, module, registry)


_INTERNAL = ("diffusion_lens", "jaxtyping", "beartype", "typeguard")


def check_positions(positions: Positions, prompts: PreparedPrompts, *, argument: str = "positions") -> None:
    """The template selectors need prompts rendered with a chat template that has those tokens.

    Example:
        >>> check_positions(parse_positions("pre_instruction"), prepare_prompts(model, token_ids))  # ValueError
    """
    if positions.kind not in TEMPLATE:
        return
    if prompts.template is None:
        raise ValueError(
            f"{argument}={positions.kind!r} needs the chat template, but these prompts are token ids (or were not "
            "rendered with a template). Name the positions instead, e.g. positions=['prompt[-3]', 'prompt[-2]', "
            "'last_prompt'] for the last three prompt tokens."
        )
    if not positions.template_tokens(prompts.template):
        raise ValueError(f"The chat template has no {positions.kind} tokens; choose other positions.")


@dataclass
class Selector:
    """How to read positions out of a [batch pos ...] activation: gather `index` [batch n_sel],
    average with `weights` [batch pos] (one pooled position), or keep every `valid` position.

    Example:
        >>> sel = selector(parse_positions("last_prompt"), hook.state, None, [0, 1])
        >>> sel.read(act).shape                     # [batch 1 d_model]
    """

    index: Optional[Int[Tensor, "batch n_sel"]] = None
    weights: Optional[Float[Tensor, "batch pos"]] = None
    valid: Optional[Tensor] = None  # bool [batch pos] for "every position" selection

    def read(self, act: Tensor) -> Tensor:
        """[batch pos *feat] -> [batch n_sel *feat] (index), [batch *feat] (pooled), [k *feat] (every)."""
        x = act.double()
        if self.index is not None:
            idx = self.index.view(*self.index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
            return x.gather(1, idx)
        if self.weights is not None:
            w = self.weights.view(*self.weights.shape, *([1] * (x.ndim - 2)))
            return (x * w).sum(1)
        return x[self.valid]


def selector(positions: Positions, state, template: Optional[InstructionTemplate], indices: Sequence[int]) -> Selector:
    """The `Selector` for one denoising state's canvas (`hook.state`), lined up with the columns the
    forward computes (`state.computed`); checks offsets and template tokens per row, and that every
    selected position is computed. `indices` are the batch's prompt indices (for error messages).

    Example:
        >>> sel = selector(parse_positions("mean_prompt"), hook.state, None, range(hook.state.batch))
        >>> sel.read(act)     # act: [batch computed_pos d_model]
    """
    return _computed_part(_canvas_selector(positions, state, template, indices), positions, state)


def _computed_part(chosen: Selector, positions: Positions, state) -> Selector:
    """`chosen` (over canvas columns) restricted to the columns this forward computes; an error when it
    selects a column outside them. "mean_response" is the mean over the response columns computed
    (a block-by-block sampler's canvas, e.g. DiffusionGemma's decoder window)."""
    cols = state.computed
    if cols == slice(0, state.n_pos):
        return chosen
    if chosen.valid is not None:
        return Selector(valid=chosen.valid[:, cols])
    if chosen.index is not None:
        outside = (chosen.index < cols.start) | (chosen.index >= cols.stop)
    elif positions.kind == "mean_response" and bool((chosen.weights[:, cols] > 0).all(0).any()):
        inside = chosen.weights[:, cols] > 0
        return Selector(weights=inside.double() / inside.sum(1, keepdim=True))
    else:
        outside = chosen.weights.clone()
        outside[:, cols] = 0
        outside = outside != 0
    if bool(outside.any()):
        P = state.response_start
        part = "the prompt" if cols.stop <= P else ("the response" if cols.start >= P else "prompt and response")
        where = f"step {state.step}" + (f" (the {state.pass_name!r} pass)" if state.pass_name is not None else "")
        hint = ("; read prompt positions in the pass that computes the prompt and canvas positions in the one that "
                "computes the canvas (pass_name=)" if state.pass_name is not None else "")
        label = list(positions.labels) if positions.kind == "offsets" else repr(positions.kind)
        raise ValueError(
            f"positions={label} select canvas columns this forward does not compute: {where} computes columns "
            f"[{cols.start}, {cols.stop}) ({part}; the response starts at {P}){hint}."
        )
    if chosen.index is not None:
        return Selector(index=chosen.index - cols.start)
    return Selector(weights=chosen.weights[:, cols])


def _canvas_selector(positions: Positions, state, template: Optional[InstructionTemplate], indices: Sequence[int]
                     ) -> Selector:
    """The `Selector` over every canvas column of `state`."""
    tokens, P = state.canvas, state.response_start
    b, n_pos = tokens.shape
    device = tokens.device
    n_pad = state.is_pad.sum(1)
    cols = torch.arange(n_pos, device=device)[None, :]
    real = ~state.is_pad
    if positions.kind == "every":
        return Selector(valid=real)
    if positions.kind in POOLED:
        chosen = {"mean_prompt": real & (cols < P), "mean_response": cols >= P, "mean_all": real}[positions.kind]
        chosen = chosen.expand(b, -1)
        counts = chosen.sum(1, keepdim=True)
        if bool((counts == 0).any()):
            raise ValueError(f"positions={positions.kind!r} selects no position in some canvas (gen_length 0?).")
        return Selector(weights=chosen.double() / counts)
    if positions.kind in TEMPLATE:
        part = positions.template_tokens(template)
        n = len(part)
        if positions.kind == "pre_instruction":
            index = n_pad[:, None] + torch.arange(n, device=device)[None, :]
        else:
            index = (P - n + torch.arange(n, device=device))[None, :].expand(b, -1)
        got = tokens.gather(1, index)
        bad = (~(got == torch.tensor(part, device=device)).all(1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"Prompts {[indices[i] for i in bad]} do not {'start' if positions.kind == 'pre_instruction' else 'end'} "
                f"with the chat template's {positions.kind} tokens {part} (the tokenizer merged them with the user "
                "text?). Name explicit positions for these prompts."
            )
        return Selector(index=index.contiguous())
    offsets = torch.tensor(positions.offsets, device=device)
    index = (P + offsets)[None, :].expand(b, -1)
    if bool((index < n_pad[:, None]).any()) or bool((index >= n_pos).any()):
        shortest = int(P - n_pad.max())
        raise ValueError(
            f"positions {list(positions.labels)} reach outside a canvas: the shortest prompt in this batch has {shortest} "
            f"tokens (prompt[-{shortest}] at most), the response {n_pos - P} positions (response[{n_pos - P - 1}] at most)."
        )
    return Selector(index=index.contiguous())


__all__ = ["POOLED", "TEMPLATE", "PositionSpec", "Positions", "Selector", "parse_positions", "selector", "selector_name"]
