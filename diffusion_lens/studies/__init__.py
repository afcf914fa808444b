"""Studies built on the library: the paper's refusal study on the embedded model and the code that
trained that model. They sit on top of the layers and use only the public API (a test checks every
import), so they double as worked examples of it.

* :mod:`diffusion_lens.studies.refusal_demo`: `make demo` / `python -m diffusion_lens demo`, the headline
  study of "Activation Steering for Masked Diffusion Language Models" (Shnaidman et al.) end to end.
* :mod:`diffusion_lens.studies.crosslingual`: `cross_lingual_transfer`, a direction from one language
  ablated on prompts in another (it was `diffusion_lens.evals.cross_lingual_transfer`).
* :mod:`diffusion_lens.studies.tiny_refusal`: the synthetic bilingual chat data, tokenizer and training
  script of the embedded `tiny-refusal` model (its weights stay package data in
  `diffusion_lens/pretrained/tiny-refusal/`, loaded by `from_pretrained("tiny-refusal")`).

Example:
    >>> from diffusion_lens.studies import cross_lingual_transfer
    >>> from diffusion_lens.studies.tiny_refusal import generate_dataset, prompts
"""

from diffusion_lens.studies.crosslingual import cross_lingual_transfer

__all__ = ["cross_lingual_transfer"]
