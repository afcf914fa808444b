"""Prompts -> 1-D token tensors (chat template applied) -> left-padded batches.

Every analysis that reads the canvas a sampler starts from prepares its prompts here: strings are
rendered with the chat template and tokenized as the samplers do, token prompts are checked, a
`datasets.Dataset` gives its prompt column; batches are left-padded (the samplers' convention) and
grouped so that padding never changes the model's function (`batch_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from diffusion_lens.prompts.sets import prompt_texts
from diffusion_lens.prompts.templates import InstructionTemplate, instruction_template

# ... or a datasets.Dataset, whose prompt column is detected or named with column= (see prepare_prompts)
PromptsInput = Union[Sequence[str], Int[Tensor, "_n _pos"], Sequence[Tensor], Sequence[Sequence[int]], "datasets.Dataset"]


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
    """Raise unless `batch_size` is a positive int.

    Example:
        >>> check_batch_size(0)      # ValueError: batch_size must be a positive int; got 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")


def in_prompt_order(parts: Sequence[Tensor], indices: Sequence[Sequence[int]]) -> Tensor:
    """Concatenate per-batch results [b ...] and put the rows back in prompt order.

    Example:
        >>> in_prompt_order([torch.tensor([10, 30]), torch.tensor([20])], [[0, 2], [1]])
        tensor([10, 20, 30])
    """
    order = torch.tensor([i for batch in indices for i in batch])
    stacked = torch.cat(list(parts))
    out = torch.empty_like(stacked)
    out[order.to(stacked.device)] = stacked
    return out


__all__ = [
    "PreparedPrompts", "PromptsInput", "batch_indices", "check_batch_size", "in_prompt_order", "left_pad",
    "prepare_prompts",
]
