"""A small byte-level BPE tokenizer with LLaDA's special-token layout and chat template.

Why mirror LLaDA: the library's analyses (pre-/post-instruction token positions, the mask
token, EOS padding of the generation canvas) are written against LLaDA's conventions, so the
toy model should follow them exactly, only with a tiny vocabulary.  Byte-level BPE keeps
every Chinese character encodable even with a 2k vocabulary.

Special tokens take fixed ids 0..5, before any learned token:

====  ========================  ==========================================
 id   token                     role
====  ========================  ==========================================
 0    ``<|startoftext|>``       BOS (written by the chat template)
 1    ``<|endoftext|>``         EOS and PAD (pads the generation canvas)
 2    ``<|mdm_mask|>``          diffusion mask token
 3    ``<|start_header_id|>``   opens a role header
 4    ``<|end_header_id|>``     closes a role header
 5    ``<|eot_id|>``            ends a message
====  ========================  ==========================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from diffusion_lens.studies.tiny_refusal.data import Example

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"

CJK_CHARACTER = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
"""One CJK ideograph (extension A, unified, compatibility): the unit Chinese text is split into."""

SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, MASK, START_HEADER, END_HEADER, EOT)
"""Special tokens in id order: ``SPECIAL_TOKENS[i]`` has id ``i``."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
"""LLaDA's chat template, except that the assistant header is always appended.

One user turn renders as ``<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{text}
<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`` (no line break before ``<|eot_id|>``):
the tokens before ``{text}`` are the pre-instruction tokens, those after it the post-instruction tokens.
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it with LLaDA's conventions."""
    backend = Tokenizer(models.BPE())
    # Each Chinese character is its own pre-token, so merges never cross characters: a held-out
    # Chinese word tokenises into characters seen in other words instead of into unseen pieces.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **_tokenizer_kwargs())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tokenizer_kwargs() -> dict[str, Any]:
    """Constructor settings shared by :func:`_wrap` and the saved ``tokenizer_config.json``.

    Left padding because batched diffusion generation places every prompt right before its
    mask canvas; BOS is not added automatically because the chat template writes it.
    """
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the special tokens by role: bos, eos, pad, mask, start_header, end_header, eot."""
    ids = {
        "bos": BOS, "eos": EOS, "pad": EOS, "mask": MASK,
        "start_header": START_HEADER, "end_header": END_HEADER, "eot": EOT,
    }
    return {role: tokenizer.convert_tokens_to_ids(token) for role, token in ids.items()}


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Written by hand rather than with ``save_pretrained`` so that the chat template sits inside
    ``tokenizer_config.json`` (as in LLaDA's repository) whatever the transformers version;
    ``AutoTokenizer.from_pretrained(folder)`` loads the result without remote code.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_tokenizer_kwargs(),
        "model_max_length": 128,
        "chat_template": tokenizer.chat_template,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    return folder


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def encode_prompt(tokenizer: PreTrainedTokenizerFast, example: Example) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header."""
    text = tokenizer.apply_chat_template(example.to_messages(), tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_example(tokenizer: PreTrainedTokenizerFast, example: Example, gen_length: int) -> tuple[list[int], int]:
    """``(input_ids, prompt_len)`` for masked-diffusion SFT, following LLaDA.

    ``input_ids`` is the templated prompt followed by a canvas of exactly ``gen_length``
    tokens: the response, one ``<|endoftext|>``, and more ``<|endoftext|>`` as padding.  The
    padding is part of the answer (LLaDA trains on it), which teaches the model to fill the
    unused canvas with EOS.  Responses are never truncated -- a cut answer would teach wrong
    outputs -- so a response that does not fit raises ``ValueError``; callers that want to skip
    such examples catch it.
    """
    prompt_ids = encode_prompt(tokenizer, example)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    answer_ids = tokenizer.encode(example.response, add_special_tokens=False) + [eos_id]
    if len(answer_ids) > gen_length:
        raise ValueError(
            f"response needs {len(answer_ids)} tokens with EOS but gen_length is {gen_length}: {example.response!r}"
        )
    return prompt_ids + answer_ids + [eos_id] * (gen_length - len(answer_ids)), len(prompt_ids)
