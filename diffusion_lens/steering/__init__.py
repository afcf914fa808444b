"""Steering primitives for masked diffusion LMs: directions, runtime interventions (hook lists),
affine transport maps, permanent weight edits, direction selection, sensitivity and patching
across denoising steps.

Runtime interventions return TransformerLens hook lists for `model.run_with_hooks(fwd_hooks=...)`,
`model.hooks(...)` and `model.generate(hooks=...)`; `steps=` / `denoise_blocks=` / `positions=` schedule them
through `diffusion_lens.denoising.hooks.at`. Permanent edits change weights in place. Results (`Directions`,
`Selection`, `Sensitivity`, `PatchingResult`) `.save(path)` / `.load(path)` as safetensors + JSON
(`diffusion_lens.core.results_io`) and convert with `.to_pandas()`.
"""

from diffusion_lens.prompts import instruction_template, prepare_prompts
from diffusion_lens.steering.abliteration import (AblationKernel, AbliterationEdit, AbliterationHandle,
                                                 interpolate_direction, model_components)
from diffusion_lens.steering.collect import collect_activations
from diffusion_lens.steering.directions import Directions, PCAResult, class_pca, mean_difference
from diffusion_lens.steering.interventions import ABLATION_SITES, ablate, add, project_coefficient
from diffusion_lens.steering.patching import PatchingResult, patch_across_steps
from diffusion_lens.steering.replay import CanvasProbe, record_run, replay
from diffusion_lens.steering.selection import Selection, select_direction
from diffusion_lens.steering.sensitivity import Sensitivity, sensitivity
from diffusion_lens.steering.subspace import LearnedSubspace, learn_subspace, subspace_ablation_hooks
from diffusion_lens.steering.transport import AffineMap, fit_transport, fold
from diffusion_lens.steering.weights import orthogonalize_weights, residual_writers

__all__ = [
    "ABLATION_SITES", "AblationKernel", "AbliterationEdit", "AbliterationHandle", "AffineMap", "CanvasProbe",
    "Directions", "LearnedSubspace", "PCAResult", "PatchingResult", "Selection", "Sensitivity", "ablate", "add", "class_pca",
    "collect_activations", "fit_transport", "fold", "instruction_template", "interpolate_direction",
    "learn_subspace", "mean_difference", "model_components", "orthogonalize_weights", "patch_across_steps", "prepare_prompts", "project_coefficient",
    "record_run", "replay", "residual_writers", "select_direction", "sensitivity", "subspace_ablation_hooks",
]
