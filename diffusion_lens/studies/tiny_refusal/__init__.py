"""Data and tokenizer for the embedded toy model "tiny-refusal".

The toy model is a tiny masked-diffusion LM trained on CPU so that the library can reproduce
refusal-direction and format-steering results without downloading a large checkpoint.
:mod:`diffusion_lens.studies.tiny_refusal.data` generates its bilingual chat data; :mod:`diffusion_lens.studies.tiny_refusal.tokenizer`
builds a byte-level BPE tokenizer with LLaDA's special tokens and chat template.
"""

from diffusion_lens.studies.tiny_refusal.data import (
    FORMATS,
    HELD_OUT_TEMPLATES,
    HELD_OUT_TOPICS,
    REFUSAL_MARKERS,
    Example,
    check_format,
    corpus,
    generate_dataset,
    is_refusal,
    prompts,
    select,
)
from diffusion_lens.studies.tiny_refusal.tokenizer import (
    SPECIAL_TOKENS,
    encode_example,
    encode_prompt,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

__all__ = [
    "FORMATS",
    "HELD_OUT_TEMPLATES",
    "HELD_OUT_TOPICS",
    "REFUSAL_MARKERS",
    "SPECIAL_TOKENS",
    "Example",
    "check_format",
    "corpus",
    "encode_example",
    "encode_prompt",
    "generate_dataset",
    "is_refusal",
    "prompts",
    "save_tokenizer",
    "select",
    "special_token_ids",
    "train_tokenizer",
]
