"""One module per model family: each translates a checkpoint format onto the core model.

Importing this package registers every shipped adapter with `diffusion_lens.checkpoints.adapters`.
"""

from model_adapters import llada  # noqa: F401
from model_adapters import dream  # noqa: F401
from model_adapters import llada_moe  # noqa: F401
from model_adapters import mmada  # noqa: F401
from model_adapters import diffusion_gemma  # noqa: F401
from model_adapters import llada2  # noqa: F401
