"""diffusion_lens: interpretability and steering for masked diffusion language models.

The package is layered; each layer imports only the ones below it (checked by import-linter,
`[tool.importlinter]` in pyproject.toml; the diagram is in docs/architecture.md):

    studies, __main__        the papers' studies on the embedded models, the CLI
    harness                  the lm-eval-harness model "diffusion-lens" (the `eval` extra)
    abliterate               the automatic abliteration search (the `abliterate` extra)
    plot                     figures
    steering                 directions, interventions, transport maps, weight edits, selection, patching
    evals                    judges, resumable evaluation runs, scores on logits, the diffusion KL
    prompts                  prompt sets, chat templates, batching
    model                    HookedDiffusionTransformer = core + denoising + checkpoints
    model_adapters           one module per family (a top-level package)
    checkpoints              the adapter contract and registry; safetensors I/O
    denoising                samplers, the generate driver, step-scheduled hooks, step caches
    core                     config, components, the hookable forward, activation caches
"""

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising import hooks
from diffusion_lens.model import HookedDiffusionTransformer

__all__ = ["DiffusionConfig", "HookedDiffusionTransformer", "hooks"]
__version__ = "0.1.0"
