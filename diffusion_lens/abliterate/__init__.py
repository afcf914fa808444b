"""Automatic abliteration for diffusion LMs (heretic's search, with costs measured on the
denoising process): `search` runs or resumes an Optuna study of `AbliterationEdit`s, `write_front`
and `save_abliterated` write its results. See `diffusion_lens.abliterate.study` for the objectives.

Example:
    >>> from diffusion_lens.abliterate import search, save_abliterated
    >>> result = search(model, harmful_train, harmless_train, harmful_eval, harmless_eval, trials=60,
    ...                 storage="sqlite:///abl/study.db", generate_kwargs=dict(gen_length=32, steps=32))
    >>> save_abliterated(model, result, result.choose(max_kl=0.1), "abl/model")
"""

from diffusion_lens.abliterate.outputs import front_table, save_abliterated, write_front
from diffusion_lens.abliterate.study import Candidates, SearchResult, SearchSpace, search, suggest_edit

__all__ = ["Candidates", "SearchResult", "SearchSpace", "front_table", "save_abliterated", "search", "suggest_edit",
           "write_front"]
