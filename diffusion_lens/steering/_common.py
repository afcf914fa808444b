"""Small shared helpers of the steering package: argument checks with clear messages, layer
resolution, unit vectors / orthonormal bases, and the one call that delegates step / position
scheduling to `diffusion_lens.denoising.hooks`.

Every check names what was expected and what was received, because these functions are called
with tensors from many places (caches, directions, user code) and a silent broadcast is the
worst failure a steering method can have.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import torch
import tqdm.auto
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.denoising import hooks as H

LayerSpec = Union[str, int, Iterable[int], None]
Hook = tuple[str, Callable]


def resolve_layers(model, layers: LayerSpec, *, argument: str = "layers") -> list[int]:
    """Layer indices from "all", None (= all), an int (negative counts from the end) or an iterable.

    Raises a ValueError naming the valid range for an unknown layer, and a TypeError for any other type.
    """
    n_layers = model.cfg.n_layers
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(n_layers))
    if isinstance(layers, str):
        raise ValueError(f"{argument} must be 'all', an int or a list of ints; got the string {layers!r}.")
    if isinstance(layers, bool):
        raise TypeError(f"{argument} must be 'all', an int or a list of ints; got {layers!r}.")
    if isinstance(layers, (int, torch.SymInt)) or (isinstance(layers, Tensor) and layers.ndim == 0):
        layers = [int(layers)]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, Tensor)):
            raise TypeError(f"{argument} must hold ints; got {layer!r} ({type(layer).__name__}).")
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"Unknown layer {layer} in {argument}: this model has {n_layers} layers (expected 0..{n_layers - 1}, "
                f"or negative indices from the end)."
            )
        out.append(layer % n_layers)
    if not out:
        raise ValueError(f"{argument} is empty; pass 'all' or at least one layer index.")
    return sorted(set(out))


def check_vector(
    model, vector: Any, *, name: str = "direction", allow_subspace: bool = False
) -> Float[Tensor, "... d_model"]:
    """A float tensor [d_model] (or [k d_model] if `allow_subspace`) on the model's device.

    Accepts a `Directions`-like object only through its explicit tensors (see `as_tensor`).
    """
    vector = as_tensor(vector, name=name)
    d_model = model.cfg.d_model
    allowed = "[d_model]" + (" or [k d_model]" if allow_subspace else "")
    if vector.ndim not in ((1, 2) if allow_subspace else (1,)) or vector.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape {allowed} = [{d_model}]; got {tuple(vector.shape)}.")
    if allow_subspace and vector.ndim == 2 and not 1 <= vector.shape[0] <= d_model:
        raise ValueError(f"{name} as a subspace must have 1..{d_model} rows; got {vector.shape[0]}.")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return vector.to(model.W_E.device)


def as_tensor(value: Any, *, name: str) -> Tensor:
    """Check that `value` is a floating-point tensor (a clear TypeError otherwise)."""
    if hasattr(value, "direction_tensor"):  # a Directions object with a single (layer, pos) entry
        value = value.direction_tensor()
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}.")
    return value


def unit(vector: Float[Tensor, " d"], *, name: str = "direction") -> Float[Tensor, " d"]:
    """`vector / |vector|` in float64 (the caller casts); raises for a (near) zero vector."""
    v64 = vector.detach().double()
    norm = v64.norm()
    if not norm > 1e-12:
        raise ValueError(f"{name} has zero norm; cannot normalise it.")
    return v64 / norm


def orthonormal_rows(basis: Float[Tensor, "k d"], *, name: str = "subspace") -> Float[Tensor, "k d"]:
    """An orthonormal basis (float64, rows) of the span of the rows of `basis` (QR); raises if rank-deficient."""
    q, r = torch.linalg.qr(basis.detach().double().T)
    diag = r.diagonal().abs()
    if not bool((diag > 1e-10 * max(float(diag.max()), 1e-300)).all()):
        raise ValueError(f"The rows of {name} are linearly dependent; pass {basis.shape[0]} independent vectors.")
    return q.T.contiguous()


def check_strength(strength: float, *, name: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1]; got {strength!r}.")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0 = no change, 1 = the full map); got {strength}.")
    return strength


def schedule(
    hooks: list[Hook], steps: Any = None, positions: Any = None, denoise_blocks: Any = None, passes: Any = None
) -> list[Hook]:
    """Restrict hook functions to denoising `steps`, semi-autoregressive `denoise_blocks`, model
    `passes` and `positions`.

    The scheduling rules live in `diffusion_lens.denoising.hooks.at` (one place for them); this only
    forwards. With all four None the hooks are returned unchanged and fire at every step, pass and
    position. In a plain forward (no denoising state) step / block filters do not apply; pass
    filters do (`hook.pass_name`).
    """
    if steps is None and positions is None and denoise_blocks is None and passes is None:
        return hooks
    return [H.at(name, fn, steps=steps, denoise_blocks=denoise_blocks, positions=positions, passes=passes)
            for name, fn in hooks]


def require_pandas(what: str):
    """The pandas module, or an ImportError that says how to get it (pandas is optional: the
    steering results' `to_pandas()` import it when called).

    Example:
        >>> pd = require_pandas("Selection.to_pandas()")
    """
    try:
        import pandas
    except ImportError:
        raise ImportError(f"{what} needs pandas: pip install pandas (it is also installed with `datasets`).") from None
    return pandas


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar (`tqdm.auto`: a widget in notebooks) that `progress=False` turns off; like `generate`'s
    bar it is also off outside a terminal or notebook, so logs and CI output stay clean.

    Example:
        >>> with progress_bar(12, "candidates", progress=True) as bar:
        ...     bar.update()
    """
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False; got {progress!r}.")
    return tqdm.auto.tqdm(total=total, desc=desc, disable=None if progress else True, leave=False)
