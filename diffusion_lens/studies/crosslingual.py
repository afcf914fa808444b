"""Cross-lingual transfer: a direction found in language A, applied to prompts in language B.

Shnaidman et al. report strong EN <-> ZH transfer of the refusal direction within one MDLM.
`cross_lingual_transfer` measures it with the step-0 refusal score (no generation needed) and,
optionally, the text refusal rate of generated responses.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.evals import refusal_rate, refusal_score
from diffusion_lens.prompts import PromptsInput, batch_indices, left_pad, prepare_prompts
from diffusion_lens.steering import ablate, mean_difference


def cross_lingual_transfer(
    model,
    direction: Float[Tensor, " d_model"],
    target_harmful: PromptsInput,
    *,
    target_harmless: Optional[PromptsInput] = None,
    layer: Optional[int] = None,
    position: Union[str, int] = "last_prompt",
    refusal_tokens: Optional[Sequence[int]] = None,
    generate_kwargs: Optional[dict] = None,
    gen_length: int = 128,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Apply a direction from language A (`direction`) to harmful prompts in language B.

    Returns the mean step-0 refusal score and the fraction of prompts with score > 0, without and
    with `ablate(model, direction)`. With `target_harmless` and `layer`, also the cosine between
    `direction` and language B's own mean difference at (`layer`, `position`: one position selector of
    `mean_difference`, e.g. "last_prompt", "post_instruction", "mean_response"). With
    `generate_kwargs` (passed to `model.generate`), also text refusal rates of the responses.

    Example:
        >>> en = mean_difference(model, harmful_en, harmless_en, layers=[8], positions="last_prompt")
        >>> r_en = en.unit(8, "last_prompt")
        >>> res = cross_lingual_transfer(model, r_en, harmful_zh, target_harmless=harmless_zh, layer=8)
        >>> res["score_base"], res["score_ablated"], res["cosine"]
    """
    hooks = ablate(model, direction)  # checks the direction: a finite, nonzero float tensor of width d_model
    if direction.ndim != 1:
        raise ValueError(f"direction must be one vector [d_model]; got shape {tuple(direction.shape)}. "
                         "For a subspace, call cross_lingual_transfer once per basis vector.")
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
        out["cosine"] = float(F.cosine_similarity(direction.detach().double().cpu(), own.unit(layer, label).cpu(), dim=0))
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
