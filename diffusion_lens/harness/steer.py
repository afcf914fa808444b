"""Steering given as a path on the lm-eval command line: a saved `Directions`, an `AffineMap` or an
abliterated model, turned into hooks (or a model folder) plus a JSON-able record of what was done.

Why: `--model_args steer=PATH,strength=0.8` must name every steering result the library saves,
and the results file must say exactly which intervention produced the scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from diffusion_lens.steering import AffineMap, Directions, ablate, add

#: What `steer=` accepts, for error messages.
STEER_KINDS = ("a saved Directions folder (result.json + tensors.safetensors)",
               "an AffineMap file (.safetensors written by AffineMap.save)",
               "an abliterated model folder (with abliteration.json) or its abliteration.json")
MODES = ("ablate", "add")


@dataclass
class Steering:
    """A resolved `steer=` argument: hooks for every forward and the record for the results.

    `model_folder` is set for an abliterated model (its weights are the edit: no hooks).

    Example:
        >>> s = resolve_steering(model, "runs/dirs", mode="ablate", strength=1.0, layers=None, steps=None)
        >>> out = model.generate(prompts, hooks=s.hooks)
        >>> s.record["kind"]
        'Directions'
    """

    hooks: list = field(default_factory=list)
    record: dict = field(default_factory=dict)


def abliterated_folder(path) -> Optional[Path]:
    """The model folder when `path` is an abliterated model (folder with abliteration.json, or that file).

    Example:
        >>> abliterated_folder("abl/model")          # PosixPath('abl/model') when abl/model/abliteration.json exists
    """
    path = Path(path)
    if path.is_file() and path.name == "abliteration.json":
        return path.parent
    if path.is_dir() and (path / "abliteration.json").is_file():
        return path
    return None


def abliteration_record(folder: Path) -> dict:
    """The record of an abliterated model: its folder and abliteration.json's parameters and objectives.

    Example:
        >>> abliteration_record(Path("abl/model"))["kind"]
        'abliterated model'
    """
    card = json.loads((folder / "abliteration.json").read_text())
    return {"kind": "abliterated model", "path": str(folder),
            **{k: card[k] for k in ("trial", "params", "objectives") if k in card}}


def _parse_layer_list(value: Any, argument: str):
    """'all', an int, 'a:b' (range) or 'i;j;k' (lm-eval splits model_args on commas) -> resolve_layers input."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple, range)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return "all"
        try:
            if ":" in text:
                lo, hi = text.split(":")
                return list(range(int(lo), int(hi)))
            return [int(part) for part in text.split(";")]
        except ValueError:
            pass
    raise ValueError(f"{argument}={value!r}: give 'all', an int, a range 'a:b' (a..b-1) or a list 'i;j;k' "
                     "(semicolons: lm-eval splits --model_args on commas).")


def parse_steps(value: Any):
    """`steer_steps`: None (every step), an int, 'a:b' (range(a, b)) or 'i;j;k' -> H.at's `steps=`.

    Example:
        >>> parse_steps("0:8"), parse_steps("0;2;4"), parse_steps(3)
        (range(0, 8), [0, 2, 4], 3)
    """
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    parsed = _parse_layer_list(value, "steer_steps")
    if parsed == "all":
        return None
    if isinstance(value, str) and ":" in value:
        return range(parsed[0], parsed[-1] + 1) if parsed else parsed
    return parsed


def parse_layers(value: Any):
    """`layers`: None, 'all', an int, 'a:b' or 'i;j;k' -> the steering builders' `layers=`.

    Example:
        >>> parse_layers("2;3"), parse_layers("1:4"), parse_layers("all")
        ([2, 3], [1, 2, 3], 'all')
    """
    return _parse_layer_list(value, "layers")


def resolve_steering(model, path, *, mode: str, strength: float, layers, steps, direction_layer=None,
                     direction_position=None) -> Steering:
    """Hooks for `steer=path` on `model`: Directions (ablate, or add at `strength`) or an AffineMap at `strength`.

    `layers` restrict where the hooks act (Directions: the ablated / added layers, default all for
    ablation and the direction's own layer for addition; AffineMap: keep the sites of those blocks,
    default and 'all': every site of the map);
    `steps` schedule them by denoising step. A Directions holding several (layer, position) pairs
    needs `direction_layer` / `direction_position` to pick one.

    Example:
        >>> s = resolve_steering(model, "runs/dirs", mode="add", strength=-1.0, layers=None, steps="0:8")
        >>> s.record
    """
    path = Path(path)
    if mode not in MODES:
        raise ValueError(f"steer_mode={mode!r} must be one of {MODES}.")
    layers, steps = parse_layers(layers), parse_steps(steps)
    if path.is_dir() and (path / "result.json").is_file():
        return _from_directions(model, path, mode, strength, layers, steps, direction_layer, direction_position)
    if path.is_file() and path.suffix == ".safetensors":
        if mode != "ablate" or direction_layer is not None or direction_position is not None:
            raise ValueError("steer_mode / direction_layer / direction_position apply to a saved Directions; an "
                             f"AffineMap ({path}) is applied as it is, at `strength`.")
        return _from_map(model, path, strength, layers, steps)
    raise ValueError(f"steer={str(path)!r} is none of: {'; '.join(STEER_KINDS)}"
                     + ("" if path.exists() else " (the path does not exist)") + ".")


def _from_directions(model, path, mode, strength, layers, steps, direction_layer, direction_position) -> Steering:
    dirs = Directions.load(path)
    pairs = [(layer, pos) for layer in dirs.layers for pos in dirs.positions]
    if direction_layer is None and direction_position is None:
        if len(pairs) != 1:
            raise ValueError(f"{path} holds {len(pairs)} directions (layer, position) = {pairs}; pick one with "
                             "direction_layer=L,direction_position=POS in --model_args.")
        direction_layer, direction_position = pairs[0]
    elif direction_layer is None or direction_position is None:
        raise ValueError("Give both direction_layer and direction_position (or neither, for a single direction).")
    if (direction_layer, direction_position) not in pairs:
        raise ValueError(f"({direction_layer}, {direction_position!r}) is not in {path}: it holds {pairs}.")
    vector = dirs.vector(direction_layer, direction_position).float()
    record = {"kind": "Directions", "path": str(path), "mode": mode, "direction_layer": direction_layer,
              "direction_position": direction_position, "site": dirs.site, "step": dirs.step}
    if mode == "ablate":
        if strength != 1.0:
            raise ValueError(f"strength={strength} with steer_mode=ablate: directional ablation removes the whole "
                             "component; use steer_mode=add for a scaled addition, or an AffineMap for a partial map.")
        hooks = ablate(model, vector, "all" if layers is None else layers, steps=steps)
    else:
        layers = [direction_layer] if layers is None else layers
        hooks = add(model, vector, alpha=strength, layers=layers, steps=steps, site=dirs.site)
    record.update(strength=strength, layers="all" if layers is None else layers, steps=_jsonable(steps))
    return Steering(hooks, record)


def _from_map(model, path, strength, layers, steps) -> Steering:
    amap = AffineMap.load(path)
    if layers not in (None, "all"):
        chosen = {f"blocks.{layer % model.cfg.n_layers}." for layer in ([layers] if isinstance(layers, int) else layers)}
        keep = [site for site in amap.sites if any(site.startswith(prefix) for prefix in chosen)]
        if not keep:
            raise ValueError(f"layers={layers} selects none of the map's sites {amap.sites}.")
        amap = replace(amap, omega={s: amap.omega[s] for s in keep}, beta={s: amap.beta[s] for s in keep},
                       low_rank={s: f for s, f in amap.low_rank.items() if s in keep},
                       support=None if amap.support is None else {s: amap.support[s] for s in keep})
    model.check_hook_names(amap.sites)
    hooks = amap.as_hooks(strength=strength, steps=steps)
    record = {"kind": "AffineMap", "path": str(path), "map_kind": amap.kind, "sites": amap.sites,
              "strength": strength, "steps": _jsonable(steps)}
    return Steering(hooks, record)


def _jsonable(steps):
    return list(steps) if isinstance(steps, range) else steps
