"""Cross-lingual transfer: a direction found in language A, applied to prompts in language B.

Shnaidman et al. report strong EN <-> ZH transfer of the refusal direction within one MDLM.
`cross_lingual_transfer` measures it with the step-0 refusal score (no generation needed) and,
optionally, the text refusal rate of generated responses.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.evals.refusal import refusal_rate
from diffusion_lens.evals.scores import refusal_score
from diffusion_lens.steering._common import check_vector, unit
from diffusion_lens.steering.activations import PositionSpec, PromptsInput, batch_indices, left_pad, prepare_prompts
from diffusion_lens.steering.directions import mean_difference
from diffusion_lens.steering.interventions import ablate


def cross_lingual_transfer(
    model,
    direction: Float[Tensor, " d_model"],
    target_harmful: PromptsInput,
    *,
    target_harmless: Optional[PromptsInput] = None,
    layer: Optional[int] = None,
    position: PositionSpec = -1,
    refusal_tokens: Optional[Sequence[int]] = None,
    generate_kwargs: Optional[dict] = None,
    gen_length: int = 128,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Apply a direction from language A (`direction`) to harmful prompts in language B.

    Returns the mean step-0 refusal score and the fraction of prompts with score > 0, without and
    with `ablate(model, direction)`. With `target_harmless` and `layer`, also the cosine between
    `direction` and language B's own mean difference at (`layer`, `position`). With
    `generate_kwargs` (passed to `model.generate`), also text refusal rates of the responses.

    Example:
        >>> r_en = mean_difference(model, harmful_en, harmless_en, layers=[8], positions=-1).unit(8, -1)
        >>> res = cross_lingual_transfer(model, r_en, harmful_zh, target_harmless=harmless_zh, layer=8)
        >>> res["score_base"], res["score_ablated"], res["cosine"]
    """
    vector = check_vector(model, direction, name="direction")
    hooks = ablate(model, vector)
    kw = dict(refusal_tokens=refusal_tokens, gen_length=gen_length, batch_size=batch_size)
    base = refusal_score(model, target_harmful, **kw)
    steered = refusal_score(model, target_harmful, hooks=hooks, **kw)
    out: dict[str, Any] = {
        "score_base": float(base.mean()), "score_ablated": float(steered.mean()),
        "refusing_base": float((base > 0).double().mean()), "refusing_ablated": float((steered > 0).double().mean()),
    }
    if target_harmless is not None:
        if layer is None:
            raise ValueError("Pass layer= (and position=) to compare with language B's own direction.")
        own = mean_difference(model, target_harmful, target_harmless, layers=[layer], positions=position,
                              gen_length=gen_length, batch_size=batch_size)
        label = own.positions[0]
        out["cosine"] = float(torch.dot(unit(vector).cpu(), own.unit(layer, label).cpu()))
    if generate_kwargs is not None:
        prepared = prepare_prompts(model, target_harmful)
        texts = {"base": [], "ablated": []}
        for indices in batch_indices(model, prepared, batch_size):
            tokens, mask, _ = left_pad(model, [prepared.tokens[i] for i in indices])
            for key, extra in (("base", []), ("ablated", hooks)):
                gen = model.generate(tokens, attention_mask=mask, hooks=extra, **{"progress": False, **generate_kwargs})
                if gen.texts is None:
                    raise ValueError("Text refusal rates need a tokenizer; call without generate_kwargs.")
                texts[key] += gen.texts
        out["refusal_rate_base"] = refusal_rate(texts["base"])
        out["refusal_rate_ablated"] = refusal_rate(texts["ablated"])
    return out


__all__ = ["cross_lingual_transfer"]
