"""Steering primitives for masked diffusion LMs: directions, runtime interventions (hook lists),
affine transport maps, permanent weight edits, direction selection and patching across steps.

Runtime interventions return TransformerLens hook lists for `model.run_with_hooks(fwd_hooks=...)`,
`model.hooks(...)` and `model.generate(hooks=...)`; permanent edits change weights in place.
"""

from diffusion_lens.steering.activations import collect_activations, instruction_template, prepare_prompts
from diffusion_lens.steering.directions import Directions, PCAResult, class_pca, mean_difference
from diffusion_lens.steering.interventions import ABLATION_SITES, ablate, add, project_coefficient
from diffusion_lens.steering.transport import AffineMap, fit_transport, fold
from diffusion_lens.steering.weights import orthogonalize_weights, residual_writers

__all__ = [
    "ABLATION_SITES", "AffineMap", "Directions", "PCAResult", "ablate", "add", "class_pca",
    "collect_activations", "fit_transport", "fold", "instruction_template", "mean_difference",
    "orthogonalize_weights", "prepare_prompts", "project_coefficient", "residual_writers",
]
