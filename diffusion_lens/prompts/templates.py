"""The chat-template tokens around the user's text (pre- / post-instruction), found generically.

Position selectors such as "pre_instruction" / "post_instruction" name these tokens; they are found
by rendering one user turn around sentinel texts (no per-family tables), so any template works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_SENTINELS = ("Describe the colour of the sky", "zq xylophone quartz 7 jumps")


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


__all__ = ["InstructionTemplate", "instruction_template"]
