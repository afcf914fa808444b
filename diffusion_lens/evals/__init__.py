"""Evaluations for steered diffusion LMs: text refusal judge, refusal log-odds score, masked-position
(diffusion) KL against a recorded unmodified run, rank correlation, positions left masked, verifiable
instruction checks (IFEval categories), refusal judges behind one interface (`judges`: JailbreakBench's
prefix judge, the whole-response judge, local classifier and chat-guard models) and the batched,
resumable benchmark runner (`runner.evaluate`, one JSONL row per prompt).

Example:
    >>> from diffusion_lens.evals import SubstringJudge, evaluate
    >>> run = evaluate(model, prompts, judges=[SubstringJudge.jailbreakbench()], out="run.jsonl")
    >>> print(run.table())
"""

from diffusion_lens.evals.instructions import INSTRUCTION_CHECKS, check_instruction, instruction_following
from diffusion_lens.evals.judges import (
    JBB_REFUSAL_PREFIXES,
    ClassifierJudge,
    GuardJudge,
    Judge,
    SubstringJudge,
    check_pairs,
)
from diffusion_lens.evals.refusal import (
    ARDITI_MARKERS,
    CHINESE_MARKERS,
    DEFAULT_MARKERS,
    EXTENDED_MARKERS,
    is_refusal,
    normalize_text,
    refusal_rate,
)
from diffusion_lens.evals.runner import EvaluationRun, evaluate, generate_texts
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
    "JBB_REFUSAL_PREFIXES", "ClassifierJudge", "EvaluationRun", "GuardJudge", "Judge", "SubstringJudge", "check_pairs",
    "evaluate", "generate_texts",
]
