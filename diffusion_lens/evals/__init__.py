"""Evaluations for steered diffusion LMs: text refusal judge, refusal log-odds score, masked-position
(diffusion) KL against a recorded unmodified run, rank correlation, positions left masked, verifiable
instruction checks (IFEval categories)."""

from diffusion_lens.evals.instructions import INSTRUCTION_CHECKS, check_instruction, instruction_following
from diffusion_lens.evals.refusal import (
    ARDITI_MARKERS,
    CHINESE_MARKERS,
    DEFAULT_MARKERS,
    EXTENDED_MARKERS,
    is_refusal,
    normalize_text,
    refusal_rate,
)
from diffusion_lens.evals.scores import (
    DiffusionKL,
    KLReference,
    MaskedKL,
    count_left_masked,
    masked_kl,
    first_position_kl,
    kl_divergence,
    kl_reference,
    log_odds,
    rank_correlation,
    refusal_score,
    refusal_token_ids,
)

__all__ = [
    "DiffusionKL", "KLReference", "MaskedKL", "masked_kl", "kl_reference", "rank_correlation",
    "ARDITI_MARKERS", "CHINESE_MARKERS", "DEFAULT_MARKERS", "EXTENDED_MARKERS", "INSTRUCTION_CHECKS",
    "check_instruction", "count_left_masked", "first_position_kl", "instruction_following",
    "is_refusal", "kl_divergence", "log_odds", "normalize_text", "refusal_rate", "refusal_score", "refusal_token_ids",
]
