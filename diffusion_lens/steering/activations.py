"""Prompts -> step-0 canvases -> activations at chosen positions, one forward per prompt.

The canvas is the one the samplers start from: the (left-padded) prompt followed by
`gen_length` mask tokens. Every position choice is expressed relative to the prompt / response
boundary `response_start` (the padded prompt width P), which is the same column in every row:

* an int or list of ints: offsets from the boundary; -1 is the last prompt token, 0 the first
  (masked) response position, 1 the second, ...
* "pre_instruction" / "post_instruction": the chat-template tokens before / after the user's text.
  They are found generically by rendering the template around two different sentinel texts
  and taking the common token prefix / suffix (no per-family tables); each prompt is checked to
  start / end with exactly those tokens. Only for string prompts (token prompts have no
  template: pass offsets).
* "mean_prompt", "mean_response", "mean_all": the mean over the real prompt tokens, over the
  response positions, or over both (pads excluded); one pooled position.
* None (only in `collect_activations`): every non-pad position as its own sample.

Families with a logit shift (Dream) read the *prediction* for position j at residual position
j-1; the positions here are residual positions, and `first_response_logits` applies the shift
through `model.token_logits`, the one place it lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

# ... or a datasets.Dataset, whose prompt column is detected or named with column= (see prepare_prompts)
PromptsInput = Union[Sequence[str], Int[Tensor, "_n _pos"], Sequence[Tensor], Sequence[Sequence[int]], "datasets.Dataset"]
PositionSpec = Union[int, Sequence[int], str, None]
POOLED = ("mean_prompt", "mean_response", "mean_all")
TEMPLATE = ("pre_instruction", "post_instruction")

_SENTINELS = ("Describe the colour of the sky", "zq xylophone quartz 7 jumps")


class _StopForward(Exception):
    """Raised by a hook once every requested activation is read, to skip the remaining layers."""


# ----------------------------------------------------------------------------- prompts
@dataclass
class InstructionTemplate:
    """The chat-template tokens around the user text: `prefix` (pre-instruction) and `suffix`
    (post-instruction) token ids, found by `instruction_template`.

    Example:
        >>> t = instruction_template(model)
        >>> len(t.prefix), len(t.suffix)
    """

    prefix: list[int]
    suffix: list[int]


def instruction_template(model) -> InstructionTemplate:
    """Pre- and post-instruction token ids of the model's chat template, found generically.

    Renders one user turn around a sentinel text, locates the sentinel's characters in the
    rendering and, with the tokenizer's offset mapping, takes the tokens that end before it
    (pre-instruction) and those that start after it (post-instruction); a token that straddles
    the boundary counts as user text. A second sentinel must give the same tokens. Tokenizers
    without offsets fall back to the longest common token prefix / suffix of two renderings.
    Works for any template (LLaDA's headers, Dream's ChatML with its default system prompt, ...)
    without naming a family.

    Example:
        >>> t = instruction_template(model)
        >>> model.to_string(torch.tensor(t.suffix))
        '<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n'
    """
    tokenizer = model._require_tokenizer()
    found = [_locate_sentinel(model, tokenizer, s) for s in _SENTINELS]
    if any(f is None for f in found):
        return _common_affixes(model, tokenizer)
    if found[0].prefix != found[1].prefix or found[0].suffix != found[1].suffix:
        raise ValueError(
            "The chat template's tokens around the user text depend on the text itself "
            f"({found[0]} vs {found[1]}); use explicit position offsets instead of pre/post_instruction."
        )
    return found[0]


def _locate_sentinel(model, tokenizer, sentinel: str) -> Optional[InstructionTemplate]:
    text = model.chat_text(sentinel)
    start = text.find(sentinel)
    if start < 0 or text.find(sentinel, start + 1) >= 0:
        raise ValueError("Could not locate the user text in the rendered chat template (it was altered or repeated).")
    end = start + len(sentinel)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    ids, offsets = encoded["input_ids"], encoded.get("offset_mapping")
    if offsets is None:
        return None
    n_pre = 0
    while n_pre < len(ids) and offsets[n_pre][1] <= start:
        n_pre += 1
    n_post = 0
    while n_post < len(ids) - n_pre and offsets[len(ids) - 1 - n_post][0] >= end:
        n_post += 1
    return InstructionTemplate(prefix=list(ids[:n_pre]), suffix=list(ids[len(ids) - n_post :]))


def _common_affixes(model, tokenizer) -> InstructionTemplate:
    renders = [tokenizer(model.chat_text(s), add_special_tokens=False)["input_ids"] for s in _SENTINELS]
    a, b = renders
    n_pre = 0
    while n_pre < min(len(a), len(b)) and a[n_pre] == b[n_pre]:
        n_pre += 1
    n_post = 0
    while n_post < min(len(a), len(b)) - n_pre and a[-1 - n_post] == b[-1 - n_post]:
        n_post += 1
    return InstructionTemplate(prefix=list(a[:n_pre]), suffix=list(a[len(a) - n_post :]))


@dataclass
class PreparedPrompts:
    """Prompts as 1-D token tensors, plus the chat template if they were rendered with one.

    Example:
        >>> p = prepare_prompts(model, ["Hi", "How are you?"])
        >>> [t.shape for t in p.tokens], p.template is not None
    """

    tokens: list[Tensor]
    template: Optional[InstructionTemplate]
    texts: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.tokens)


def prepare_prompts(
    model, prompts: PromptsInput, *, chat: Optional[bool] = None, argument: str = "prompts", column: Optional[str] = None
) -> PreparedPrompts:
    """Normalise prompts to a list of 1-D token tensors.

    Strings are rendered with the chat template (`chat=None` means: if the tokenizer has one)
    and tokenized without extra special tokens, as the samplers do. Token prompts are a [n pos]
    integer tensor (no padding) or a list of 1-D integer tensors / lists. A `datasets.Dataset`
    gives its prompt column: `column=` names it, otherwise it is detected from common names
    (`diffusion_lens.prompts.prompt_column`: prompt, instruction, goal, behavior, ...).

    Example:
        >>> p = prepare_prompts(model, ["How do I bake bread?"])
        >>> p.tokens[0][-len(p.template.suffix):].tolist() == p.template.suffix
        True
        >>> p = prepare_prompts(model, load_advbench(path="advbench.csv"))      # a datasets.Dataset
    """
    if _is_dataset(prompts):
        from diffusion_lens.prompts import prompt_texts

        try:
            prompts = prompt_texts(prompts, column)
        except (KeyError, ValueError, TypeError) as error:
            raise type(error)(f"{argument}: {error.args[0]}") from None
    elif column is not None:
        raise TypeError(f"column={column!r} names the prompt column of a datasets.Dataset, but {argument} is a "
                        f"{type(prompts).__name__}.")
    if isinstance(prompts, PreparedPrompts):
        return prompts
    if isinstance(prompts, str):
        raise TypeError(f"{argument} must be a list of prompts; got a single string. Wrap it: [{prompts[:30]!r}].")
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.dtype == torch.bool:
            raise TypeError(f"{argument} as a tensor must hold integer token ids; got dtype {prompts.dtype}.")
        if prompts.ndim != 2:
            raise ValueError(f"{argument} as a tensor must be [n pos] token ids; got shape {tuple(prompts.shape)}.")
        token_list = [row for row in prompts.long()]
        return PreparedPrompts(_check_tokens(model, token_list, argument), None)
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{argument} is empty.")
    if all(isinstance(p, str) for p in prompts):
        tokenizer = model._require_tokenizer()
        use_chat = bool(tokenizer.chat_template) if chat is None else chat
        texts = [model.chat_text(p) for p in prompts] if use_chat else prompts
        ids = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
        template = instruction_template(model) if use_chat else None
        return PreparedPrompts(_check_tokens(model, ids, argument), template, list(prompts))
    if any(isinstance(p, str) for p in prompts):
        raise TypeError(f"{argument} mixes strings and token ids; pass one kind.")
    token_list = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p)
        if t.is_floating_point() or t.dtype == torch.bool or t.ndim != 1:
            raise TypeError(f"{argument}[{i}] must be a 1-D integer token sequence; got {t.dtype} of shape {tuple(t.shape)}.")
        token_list.append(t.long())
    return PreparedPrompts(_check_tokens(model, token_list, argument), None)


def _is_dataset(prompts) -> bool:
    """A Hugging Face `datasets` object (checked by module, so `datasets` is imported only when used)."""
    return type(prompts).__module__.split(".")[0] == "datasets"


def _check_tokens(model, token_list: list[Tensor], argument: str) -> list[Tensor]:
    vocab = model.cfg.d_vocab_out
    for i, t in enumerate(token_list):
        if t.numel() == 0:
            raise ValueError(f"{argument}[{i}] is empty.")
        if int(t.min()) < 0 or int(t.max()) >= vocab:
            raise ValueError(f"{argument}[{i}] has token ids outside 0..{vocab - 1}: min {int(t.min())}, max {int(t.max())}.")
    return token_list


# ----------------------------------------------------------------------------- canvases
@dataclass
class CanvasBatch:
    """A batch of step-0 canvases: [left pads | prompt | gen_length masks].

    Example:
        >>> batch = next(step0_canvases(model, prepare_prompts(model, prompts), gen_length=8, batch_size=4))
        >>> batch.tokens[:, batch.response_start:]      # all mask tokens
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Optional[Int[Tensor, "batch pos"]]  # None when no row is padded
    response_start: int
    n_pad: Int[Tensor, " batch"]
    indices: list[int]  # indices of these prompts in the full prompt list


def left_pad(model, chunk: Sequence[Tensor]) -> tuple[Int[Tensor, "batch pos"], Optional[Int[Tensor, "batch pos"]], Tensor]:
    """Left-pad 1-D token tensors with the pad token (as the samplers expect).

    Returns (tokens [batch width], attention mask or None when no row is padded, pads per row).

    Example:
        >>> tokens, mask, n_pad = left_pad(model, [torch.tensor([5, 6]), torch.tensor([7])])
        >>> tokens.tolist(), n_pad.tolist()     # [[5, 6], [pad, 7]], [0, 1]
    """
    cfg = model.cfg
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    width = max(t.numel() for t in chunk)
    if width > min(t.numel() for t in chunk) and pad_id is None:
        raise ValueError("Prompts of different lengths need a pad token, and the config has none.")
    tokens = torch.full((len(chunk), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.ones_like(tokens)
    n_pad = torch.tensor([width - t.numel() for t in chunk])
    for row, t in enumerate(chunk):
        mask[row, : width - t.numel()] = 0
        tokens[row, width - t.numel() :] = t
    device = model.W_E.device
    return tokens.to(device), (mask.to(device) if bool((n_pad > 0).any()) else None), n_pad.to(device)


def batch_indices(model, prompts: "PreparedPrompts", batch_size: int) -> list[list[int]]:
    """Prompt indices per batch. Consecutive chunks, except where padding changes the model's
    function (`cfg.attention_mask_mode == "causal_when_padded"`, e.g. MMaDA: one padded row makes
    the whole batch causal): there each batch holds prompts of one length only, so nothing is padded.

    Example:
        >>> batch_indices(model, prepare_prompts(model, prompts), 16)     # [[0, 1, ...], [16, ...]]
        >>> [prompts[i] for i in batch_indices(model, p, 16)[0]]
    """
    check_batch_size(batch_size)
    n = len(prompts)
    if model.cfg.attention_mask_mode != "causal_when_padded":
        return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(prompts.tokens):
        by_length.setdefault(t.numel(), []).append(i)
    return [group[s : s + batch_size] for group in by_length.values() for s in range(0, len(group), batch_size)]


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")


def step0_canvases(
    model, prompts: PreparedPrompts, *, gen_length: int, batch_size: int
) -> Iterator[CanvasBatch]:
    """Batches of the canvas the sampler starts from: left-padded prompt + `gen_length` masks.
    `batch.indices` says which prompts a batch holds (see `batch_indices`).

    Example:
        >>> for batch in step0_canvases(model, prepare_prompts(model, ["Hi"]), gen_length=32, batch_size=8):
        ...     logits = model(batch.tokens, batch.attention_mask)
    """
    cfg = model.cfg
    if cfg.mask_token_id is None:
        raise ValueError("The model config has no mask_token_id; cannot build a diffusion canvas.")
    if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 0:
        raise ValueError(f"gen_length must be an int >= 0; got {gen_length!r}.")
    for indices in batch_indices(model, prompts, batch_size):
        tokens, mask, n_pad = left_pad(model, [prompts.tokens[i] for i in indices])
        masks = tokens.new_full((tokens.shape[0], gen_length), cfg.mask_token_id)
        yield CanvasBatch(
            tokens=torch.cat([tokens, masks], dim=1),
            attention_mask=None if mask is None else torch.cat([mask, torch.ones_like(masks)], dim=1),
            response_start=tokens.shape[1],
            n_pad=n_pad,
            indices=indices,
        )


def in_prompt_order(parts: Sequence[Tensor], indices: Sequence[Sequence[int]]) -> Tensor:
    """Concatenate per-batch results [b ...] and put the rows back in prompt order."""
    order = torch.tensor([i for batch in indices for i in batch])
    stacked = torch.cat(list(parts))
    out = torch.empty_like(stacked)
    out[order.to(stacked.device)] = stacked
    return out


# ----------------------------------------------------------------------------- positions
@dataclass
class Selector:
    """How to read positions out of a [batch pos ...] activation: gather `index` [batch n_sel]
    or average with `weights` [batch pos] (one pooled position)."""

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


def position_labels(spec: PositionSpec, template: Optional[InstructionTemplate]) -> list:
    """Labels of the positions a spec selects (one per output position)."""
    if spec is None:
        return ["every"]
    if isinstance(spec, str):
        if spec in POOLED:
            return [spec]
        if spec == "pre_instruction":
            return [f"pre_instruction[{i}]" for i in range(len(template.prefix))]
        if spec == "post_instruction":
            n = len(template.suffix)
            return [f"post_instruction[{i - n}]" for i in range(n)]
    return list(_offsets(spec))


def check_position_spec(spec: PositionSpec, prompts: PreparedPrompts, *, allow_every: bool = False) -> None:
    """Validate a position spec against the prompts (clear errors before any forward)."""
    if spec is None:
        if not allow_every:
            raise ValueError("positions=None is not allowed here; pass offsets, a template name or a pooled name.")
        return
    if isinstance(spec, str):
        if spec in POOLED:
            return
        if spec in TEMPLATE:
            if prompts.template is None:
                raise ValueError(
                    f"positions={spec!r} needs the chat template, but these prompts are token ids (or were not "
                    "rendered with a template). Pass explicit offsets instead, e.g. positions=[-3, -2, -1] for "
                    "the last three prompt tokens."
                )
            part = prompts.template.prefix if spec == "pre_instruction" else prompts.template.suffix
            if not part:
                raise ValueError(f"The chat template has no {spec} tokens; choose offsets or the other side.")
            return
        raise ValueError(
            f"Unknown positions {spec!r}; expected an int offset, a list of offsets, one of {TEMPLATE + POOLED}."
        )
    _offsets(spec)


def _offsets(spec) -> list[int]:
    values = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"positions must be an int, a list of ints or a name; got {spec!r}.") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"positions must be a non-empty list of int offsets; got {spec!r}.")
    return values


def make_selector(spec: PositionSpec, batch: CanvasBatch, template: Optional[InstructionTemplate]) -> Selector:
    """The `Selector` for one canvas batch (checks offsets and template tokens per row)."""
    tokens, P = batch.tokens, batch.response_start
    b, n_pos = tokens.shape
    device = tokens.device
    cols = torch.arange(n_pos, device=device)[None, :]
    real = cols >= batch.n_pad[:, None]
    if spec is None:
        return Selector(valid=real.expand(b, -1))
    if isinstance(spec, str) and spec in POOLED:
        chosen = {"mean_prompt": real & (cols < P), "mean_response": cols >= P, "mean_all": real}[spec].expand(b, -1)
        counts = chosen.sum(1, keepdim=True)
        if bool((counts == 0).any()):
            raise ValueError(f"positions={spec!r} selects no position in some canvas (gen_length 0?).")
        return Selector(weights=chosen.double() / counts)
    if isinstance(spec, str) and spec in TEMPLATE:
        part = template.prefix if spec == "pre_instruction" else template.suffix
        n = len(part)
        if spec == "pre_instruction":
            index = batch.n_pad[:, None] + torch.arange(n, device=device)[None, :]
        else:
            index = (P - n + torch.arange(n, device=device))[None, :].expand(b, -1)
        expected = torch.tensor(part, device=device)
        got = tokens.gather(1, index)
        bad = (~(got == expected).all(1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"Prompts {[batch.indices[i] for i in bad]} do not {'start' if spec == 'pre_instruction' else 'end'} "
                f"with the chat template's {spec} tokens {part} (the tokenizer merged them with the user text?). "
                "Use explicit offsets for these prompts."
            )
        return Selector(index=index.contiguous())
    offsets = torch.tensor(_offsets(spec), device=device)
    index = (P + offsets)[None, :].expand(b, -1)
    first_real = batch.n_pad[:, None]
    if bool((index < first_real).any()) or bool((index >= n_pos).any()):
        shortest = int(P - batch.n_pad.max())
        raise ValueError(
            f"positions {offsets.tolist()} reach outside a canvas: offsets must be in -{shortest}..{n_pos - P - 1} "
            f"(the shortest prompt in this batch has {shortest} tokens, gen_length is {n_pos - P})."
        )
    return Selector(index=index.contiguous())


# ----------------------------------------------------------------------------- forwards
def _site_shape_check(act: Tensor, batch: CanvasBatch, name: str) -> None:
    if act.ndim < 2 or tuple(act.shape[:2]) != tuple(batch.tokens.shape):
        raise ValueError(
            f"Hook point {name} has activations of shape {tuple(act.shape)}, not [batch pos ...] = "
            f"{tuple(batch.tokens.shape)}; per-position activations are needed (expert hooks hold routed tokens only)."
        )


def run_and_read(
    model,
    batch: CanvasBatch,
    sites: Sequence[str],
    selector: Selector,
    *,
    hooks: Sequence = (),
    need_logits: bool = False,
) -> tuple[dict[str, Tensor], Optional[Tensor]]:
    """One forward of a canvas batch; returns ({site: selected float64 activations}, logits or None).

    Stops the forward after the last site's block when logits are not needed.

    Example:
        >>> sel = make_selector(-1, batch, None)
        >>> acts, _ = run_and_read(model, batch, ["blocks.1.hook_resid_pre"], sel)
    """
    out: dict[str, Tensor] = {}

    def read(act, hook):
        _site_shape_check(act, batch, hook.name)
        out[hook.name] = selector.read(act)

    fwd = list(hooks) + [(site, read) for site in sites]
    stop_name = None if need_logits else _stop_site(model, sites)
    if stop_name is not None:
        def stop(act, hook):
            raise _StopForward

        fwd.append((stop_name, stop))
    logits = None
    with model.hooks(fwd_hooks=fwd):
        try:
            logits = model(batch.tokens, batch.attention_mask, return_type="logits" if need_logits else None)
        except _StopForward:
            pass
    missing = [s for s in sites if s not in out]
    if missing:
        raise RuntimeError(f"Hook points {missing} did not fire during the forward.")
    return out, logits


def _stop_site(model, sites: Sequence[str]) -> Optional[str]:
    layers = []
    for site in sites:
        parts = site.split(".")
        if parts[0] != "blocks":
            return None
        layers.append(int(parts[1]))
    last = max(layers)
    return f"blocks.{last}.hook_resid_post" if last < model.cfg.n_layers - 1 else None


def first_response_logits(model, logits: Float[Tensor, "batch pos vocab"], response_start: int) -> Float[Tensor, "batch vocab"]:
    """Prediction for the first response (masked) position of a canvas, logit shift applied.

    Example:
        >>> logits = model(batch.tokens, batch.attention_mask)
        >>> first_response_logits(model, logits, batch.response_start).shape   # [batch vocab]
    """
    return model.token_logits(logits)[:, response_start]


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

    Shapes per site: pooled spec -> [n *feat]; offsets / template spec -> [n n_sel *feat];
    `pooling=None` -> [n_positions *feat] (every non-pad position of every prompt, rows in order).
    Memory grows with n: for means over many prompts use `mean_difference` (streaming).

    Example:
        >>> acts = collect_activations(model, prompts, sites=["blocks.1.hook_mlp_out"], pooling="mean_all")
        >>> acts["blocks.1.hook_mlp_out"].shape        # [n d_model]
    """
    prepared = prepare_prompts(model, prompts, chat=chat)
    check_position_spec(pooling, prepared, allow_every=True)
    sites = list(sites)
    if not sites:
        raise ValueError("sites is empty; pass at least one hook point name.")
    model.check_hook_names(sites)
    per_prompt: dict[str, list] = {s: [None] * len(prepared) for s in sites}
    for batch in step0_canvases(model, prepared, gen_length=gen_length, batch_size=batch_size):
        selector = make_selector(pooling, batch, prepared.template)
        acts, _ = run_and_read(model, batch, sites, selector, hooks=hooks)
        for site in sites:
            if pooling is None:  # [k *feat] over every valid (row, position): split back per row
                counts = selector.valid.sum(1).tolist()
                pieces = acts[site].split(counts)
            else:
                pieces = acts[site].unbind(0)
            for i, piece in zip(batch.indices, pieces):
                per_prompt[site][i] = piece
    if pooling is None:
        return {site: torch.cat(parts) for site, parts in per_prompt.items()}
    return {site: torch.stack(parts) for site, parts in per_prompt.items()}


__all__ = [
    "CanvasBatch", "InstructionTemplate", "PreparedPrompts", "collect_activations", "first_response_logits",
    "batch_indices", "in_prompt_order", "instruction_template", "left_pad", "prepare_prompts", "step0_canvases",
]
