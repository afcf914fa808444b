"""Save and load analysis results without pickles: `Directions`, `Selection`, `Sensitivity`,
`PatchingResult` and `StepCache` all use this one mechanism.

Why: a direction selected in an hour-long session must outlive the kernel, and opening a result
file must never run code. A saved result is a folder holding two files:

* `tensors.safetensors`: every tensor (safetensors: no pickle, readable from any language with
  `safetensors.safe_open`, dtypes and shapes kept exactly);
* `result.json`: everything else (labels, scores, settings) with a format tag, a version and the
  result type, so loading a folder as the wrong type fails with a sentence.

Writes are atomic: the folder is built under a temporary name beside the target and renamed into
place, so a failed save leaves the previous result (or nothing), never half of one. A missing,
truncated or corrupted file fails on load with an error naming it.

Example:
    >>> sel.save("runs/selection")                      # -> runs/selection/{result.json, tensors.safetensors}
    >>> sel = Selection.load("runs/selection")
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

from torch import Tensor

FORMAT = "diffusion_lens.result"
VERSION = 1
TENSORS = "tensors.safetensors"
META = "result.json"
PathLike = Union[str, Path]


def save_result(path: PathLike, kind: str, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write `tensors` and the JSON-able `meta` of a result of type `kind` to the folder `path`, atomically.

    An existing folder is replaced only if it is itself a saved result (a `result.json` with our
    format tag); anything else at `path` is left alone and raises.

    Example:
        >>> save_result("out/dirs", "Directions", {"mean_positive": mp}, {"layers": [0, 1]})
        PosixPath('out/dirs')
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not _is_result_folder(path):
        raise FileExistsError(f"{path} exists and is not a saved diffusion_lens result; choose another path or remove it.")
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Result tensor {name!r} must be a torch.Tensor; got {type(tensor).__name__}.")
    document = {"format": FORMAT, "version": VERSION, "type": kind, "tensors": sorted(tensors),
                "meta": _encode(meta, "meta")}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        # clone: safetensors refuses views that share memory (e.g. slices of one cached activation)
        save_file({k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}, str(staging / TENSORS),
                  metadata={"format": FORMAT, "type": kind})
        (staging / META).write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        if path.exists():
            old = staging.with_name(staging.name + ".old")
            path.rename(old)
            try:
                staging.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load_result(path: PathLike, kind: str) -> tuple[dict[str, Tensor], dict]:
    """(tensors on CPU, meta) of the result of type `kind` saved at `path`; clear errors for anything else.

    Example:
        >>> tensors, meta = load_result("out/dirs", "Directions")
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No saved result at {path}: expected a folder holding {META} and {TENSORS} (written by .save(path))."
        )
    for name in (META, TENSORS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: {path} is not a complete saved result.")
    try:
        document = json.loads((path / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path / META} is corrupted (not valid JSON: {error}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or "meta" not in document:
        raise ValueError(f"{path / META} is not a diffusion_lens result file (no {FORMAT!r} format tag).")
    if document.get("version") != VERSION:
        raise ValueError(
            f"{path / META} has result format version {document.get('version')!r}; this diffusion_lens reads version "
            f"{VERSION}. Load it with the diffusion_lens version that wrote it."
        )
    if document.get("type") != kind:
        found = document.get("type")
        raise TypeError(f"{path} holds a saved {found}, not a {kind}; load it with {found}.load({str(path)!r}).")
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as error:  # safetensors raises its own SafetensorError for truncated / garbled files
        raise ValueError(f"{path / TENSORS} is corrupted or truncated ({type(error).__name__}: {error}).") from None
    expected = set(document.get("tensors", []))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{path / TENSORS} does not match {path / META}: missing tensors {missing[:5]}, unexpected {extra[:5]}."
        )
    return tensors, _decode(document["meta"])


def subset(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors saved under `prefix` + '.', with the prefix removed (for nested results).

    Example:
        >>> subset({"directions.mean_positive": t, "bypass": b}, "directions")
        {'mean_positive': t}
    """
    start = prefix + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """`tensors` with keys prefixed by `prefix` + '.' (the inverse of `subset`).

    Example:
        >>> prefixed({"mean_positive": t}, "directions")
        {'directions.mean_positive': t}
    """
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _is_result_folder(path: Path) -> bool:
    try:
        return path.is_dir() and json.loads((path / META).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _encode(value: Any, where: str) -> Any:
    """JSON-able form; tuples and non-finite floats are tagged so that they load back as they were."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"Cannot save {where}: its keys must be strings; got {bad[:3]}.")
        if set(value) & {"__tuple__", "__float__"}:
            raise TypeError(f"Cannot save {where}: the keys '__tuple__' / '__float__' are reserved.")
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"Cannot save {where}: {type(value).__name__} values are not supported (use numbers, strings, lists, "
        "tuples, dicts or None; tensors go in the tensor file)."
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


__all__ = ["FORMAT", "META", "TENSORS", "VERSION", "load_result", "prefixed", "save_result", "subset"]
