"""Prompts: the prompt sets (`sets`: AdvBench, JailbreakBench, HarmBench, Alpaca, IFEval and heretic's
loaders, fractional and 128 / 32 / 100 splits) and their preparation for a model (`templates`: the
chat-template tokens around the user text; `batching`: prompts -> token tensors -> left-padded batches).

Example:
    >>> from diffusion_lens import prompts as P
    >>> harmful = P.load_advbench(path="advbench.csv")
    >>> prepared = P.prepare_prompts(model, harmful)         # token tensors, chat template applied
"""

from diffusion_lens.prompts.batching import (
    PreparedPrompts,
    PromptsInput,
    batch_indices,
    check_batch_size,
    in_prompt_order,
    left_pad,
    prepare_prompts,
)
from diffusion_lens.prompts.sets import (
    COLUMNS,
    PROMPT_COLUMNS,
    REFUSAL_SPLIT_SIZES,
    SOURCES,
    PromptSource,
    ifeval_records,
    load_advbench,
    load_alpaca,
    load_harmbench,
    load_heretic,
    load_ifeval,
    load_jailbreakbench,
    load_prompts,
    prompt_column,
    prompt_texts,
    refusal_splits,
    split_prompts,
)
from diffusion_lens.prompts.templates import InstructionTemplate, instruction_template

__all__ = [
    "COLUMNS", "PROMPT_COLUMNS", "REFUSAL_SPLIT_SIZES", "SOURCES", "InstructionTemplate", "PreparedPrompts", "PromptSource", "PromptsInput",
    "batch_indices", "check_batch_size", "ifeval_records", "in_prompt_order", "instruction_template", "left_pad",
    "load_advbench", "load_alpaca", "load_harmbench", "load_heretic", "load_ifeval", "load_jailbreakbench", "load_prompts",
    "prepare_prompts", "prompt_column", "prompt_texts", "refusal_splits", "split_prompts",
]
