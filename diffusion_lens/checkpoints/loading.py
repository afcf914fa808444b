"""Checkpoint I/O: resolve a name to a folder, stream safetensors shards into a meta-initialised
model, and write a model back in its family's original format.

Only `*.json`, `*.safetensors` and tokenizer files are ever read from a checkpoint folder; Python
files there (`modeling_*.py`, `configuration_*.py`) are never imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from diffusion_lens.checkpoints.adapters import ModelAdapter, detect_adapter, get_adapter

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "pretrained"  # diffusion_lens/pretrained
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.md"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on the JSON header
_READ_CHUNK = 2**30  # one read() call stays below the 2 GiB a single Linux read returns

# The dtypes a model can be loaded into, by name, for `from_pretrained(dtype="bfloat16")`.
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# Folded biases the family's checkpoint format has no key for (see `save_pretrained`).
BIAS_SIDECAR = "diffusion_lens_biases.safetensors"
BIAS_SIDECAR_FORMAT = "diffusion_lens.folded_biases/1"


def resolve_checkpoint(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder, an embedded model name, or a hub id (downloaded without any `.py` file)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if (EMBEDDED_DIR / str(name_or_path)).is_dir():
        return EMBEDDED_DIR / str(name_or_path)
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # offline, unknown id, gated repo...
        raise OSError(
            f"Could not find {str(name_or_path)!r} as a local folder or embedded model, and downloading "
            f"it from the Hugging Face hub failed ({type(error).__name__}: {error}). If you are offline, "
            "download the checkpoint elsewhere and pass its local folder: "
            "HookedDiffusionTransformer.from_pretrained('/path/to/LLaDA-8B-Instruct')."
        ) from error


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a checkpoint folder?")
    return _read_json_object(config_path)


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}); re-download or re-save it.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; re-download or re-save it.")
    return value


def resolve_dtype(dtype: Union[torch.dtype, str, None]) -> Optional[torch.dtype]:
    """`dtype` as a floating torch.dtype: a torch.dtype, a name ("bfloat16", "bf16", "torch.float16")
    or None / "auto" (the checkpoint's own dtype, returned as None).

    Example:
        >>> resolve_dtype("bfloat16")
        torch.bfloat16
    """
    if dtype is None or dtype == "auto":
        return None
    resolved = DTYPE_NAMES.get(dtype.lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating dtype a model can be loaded into; use one of "
            f"{sorted(DTYPE_NAMES)}, a floating torch.dtype (torch.bfloat16), or None / 'auto' for the "
            "checkpoint's own dtype."
        )
    return resolved


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards, in index order when there is an index."""
    weight_map = _index_weight_map(folder)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is missing shards listed in its index: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("golden") and f.name != BIAS_SIDECAR]
    if not files:
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights (diffusion_lens reads safetensors only; convert "
            ".bin/.pt checkpoints with safetensors.torch.save_file first)."
        )
    return files


def _index_weight_map(folder: Path) -> Optional[dict[str, str]]:
    """`weight_map` of model.safetensors.index.json (tensor name -> shard file), None without an index."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no weight_map object of tensor name -> shard file; re-download it.")
    return weight_map


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its byte range [start, end) in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header, checked against the file: every tensor's byte range lies in the
    data section, has the byte length its dtype and shape need, and the ranges tile the section.

    Example:
        >>> header = read_safetensors_header(Path("model.safetensors"))
        >>> sorted(header.names)[:2], header.entries[0].end - header.entries[0].start   # names, bytes
    """

    path: Path
    data_start: int  # file offset of the data section (8 + header length)
    entries: tuple[TensorEntry, ...]  # sorted by start

    @property
    def names(self) -> set[str]:
        return {entry.name for entry in self.entries}


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a safetensors file, checked against the file before any tensor is read.

    Why: a truncated download used to load without a word, with garbage in the tensors past the cut.
    Checked: the 8-byte length and the JSON header fit in the file; every tensor has a known dtype,
    a shape and a byte range whose length is numel * itemsize; the ranges tile the data section
    exactly (no overlap, no gap, nothing missing at the end). Each failure names the file and the
    tensor.

    Example:
        >>> [e.name for e in read_safetensors_header(Path("model.safetensors")).entries][:1]
        ['model.transformer.blocks.0.attn_norm.weight']
    """
    size = path.stat().st_size

    def corrupt(reason: str) -> ValueError:
        return ValueError(f"{path} is not a complete safetensors file: {reason}. Re-download or re-save it.")

    if size < 8:
        raise corrupt("it is empty" if size == 0 else f"it has {size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"its first 8 bytes announce a {header_len}-byte header, but the file has {size - 8} "
                          "bytes after them (a cut file, or not safetensors at all)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise corrupt(f"its {header_len}-byte header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    entries = sorted((_header_entry(name, info, data_len, corrupt) for name, info in header.items()),
                     key=lambda entry: (entry.start, entry.end))
    covered, previous = 0, None
    for entry in entries:
        if entry.start < covered:
            raise corrupt(f"tensor {entry.name!r} (bytes {entry.start}..{entry.end}) overlaps tensor "
                          f"{previous.name!r} (bytes {previous.start}..{previous.end})")
        if entry.start > covered:
            raise corrupt(f"data bytes {covered}..{entry.start}, before tensor {entry.name!r}, belong to no tensor")
        if entry.end > entry.start:
            covered, previous = entry.end, entry
    if covered != data_len:
        raise corrupt(f"its last {data_len - covered} data bytes belong to no tensor")
    return SafetensorsHeader(path, 8 + header_len, tuple(entries))


def _header_entry(name: str, info, data_len: int, corrupt) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise corrupt(f"tensor {name!r} lacks dtype / shape / data_offsets in the header")
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise corrupt(f"tensor {name!r} has dtype {info['dtype']!r}, not one of {sorted(_SAFETENSORS_DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise corrupt(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}, not [start, end] with 0 <= start <= end")
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    start, end = offsets
    nbytes = prod(shape) * dtype.itemsize
    if end - start != nbytes:
        raise corrupt(f"tensor {name!r} is {info['dtype']} {shape} ({nbytes} bytes) but its data_offsets "
                      f"span {end - start} bytes")
    if end > data_len:
        raise corrupt(f"tensor {name!r} ends at data byte {end}, but the file holds only {data_len} data bytes "
                      "(the file is truncated)")
    return TensorEntry(name, dtype, tuple(shape), start, end)


def iter_safetensors(path: Path, header: Optional[SafetensorsHeader] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time with plain reads (no mmap), so a shard never sits
    in memory beside the tensors already loaded. The header is checked first
    (`read_safetensors_header`) and every read must return the tensor's full byte length.

    Example:
        >>> for name, tensor in iter_safetensors(Path("model.safetensors")):
        ...     print(name, tuple(tensor.shape), tensor.dtype)
    """
    header = header or read_safetensors_header(path)
    with open(path, "rb") as f:
        for entry in header.entries:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            f.seek(header.data_start + entry.start)
            done = 0
            while done < len(buffer):
                n = f.readinto(buffer[done:done + _READ_CHUNK])
                if not n:
                    raise ValueError(
                        f"{path}: reading tensor {entry.name!r} returned {done} of its {len(buffer)} bytes (the file "
                        "was cut or changed while loading). Re-download or re-save it."
                    )
                done += n
            yield entry.name, tensor


def _check_shard_names(folder: Path, headers: list[SafetensorsHeader]) -> None:
    """Every tensor is in exactly one shard, and the index (if any) points each name at the shard holding it."""
    owner: dict[str, Path] = {}
    for header in headers:
        for name in header.names:
            if name in owner:
                raise ValueError(f"Tensor {name!r} is stored twice, in {owner[name]} and in {header.path}; "
                                 "a checkpoint must hold each tensor once. Re-download or re-save it.")
            owner[name] = header.path
    weight_map = _index_weight_map(folder) or {}
    wrong = [(name, shard) for name, shard in weight_map.items() if owner.get(name) != folder / shard]
    if wrong:
        name, shard = wrong[0]
        actual = f"it is in {owner[name].name}" if name in owner else "no shard holds it"
        raise ValueError(
            f"{folder / 'model.safetensors.index.json'} points {len(wrong)} tensors at shards that do not hold them, "
            f"e.g. {name!r} at {shard} ({actual}). Re-download the checkpoint or fix its index."
        )


def _checkpoint_dtype(headers: list[SafetensorsHeader]) -> torch.dtype:
    floats = [entry.dtype for entry in headers[0].entries if entry.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def _count_and_name(keys: list[str], kind: str, n: int = 5) -> str:
    """'297 missing keys (a, b, c, d, e, ... 292 more)': an error about 300 keys stays a few lines long."""
    shown = ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")
    return f"{len(keys)} {kind} ({shown})"


class _SkipInit(TorchFunctionMode):
    """Skip `torch.nn.init` calls while building on the meta device (the checkpoint replaces every
    value). Besides saving work, this avoids the meta kernel of `normal_` (nn.Embedding's init),
    a Python reference whose first call imports torch._dynamo: ~2.5 s and ~70 MB RSS."""

    _INIT = {getattr(torch.nn.init, name) for name in dir(torch.nn.init)
             if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.nn.init, name))}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._INIT:
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **(kwargs or {}))


def load_pretrained(model_cls, name_or_path, *, dtype=None, device=None, device_map=None, max_memory=None,
                    offload_folder=None, adapter=None, revision=None):
    if device is not None and device_map is not None:
        raise ValueError(
            f"from_pretrained got device={device!r} and device_map={device_map!r}; pass one. device= puts the whole "
            "model on one device, device_map= places modules (e.g. device_map={'': 'cuda:0'} for one device)."
        )
    dtype = resolve_dtype(dtype)
    folder = resolve_checkpoint(name_or_path, revision)
    config_json = read_config(folder)
    family: ModelAdapter = get_adapter(adapter) if adapter else detect_adapter(config_json)
    cfg = _config_from(family, config_json, folder, forced=adapter is not None)
    headers = [read_safetensors_header(file) for file in checkpoint_files(folder)]  # every shard, before any read
    _check_shard_names(folder, headers)
    cfg.dtype = dtype or _checkpoint_dtype(headers)
    cfg.model_name = str(name_or_path)

    model = _meta_model(model_cls, cfg)
    placement = None
    if device_map is not None:
        placement = resolve_device_map(model, device_map, max_memory, offload_folder)
    elif max_memory is not None or offload_folder is not None:
        raise ValueError("max_memory= and offload_folder= place modules and need device_map= ('auto' or a dict); "
                         "without device_map the whole model goes to device=.")
    device = "cpu" if device is None else device
    expected = {name: param for name, param in model.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        expected.pop("unembed.weight", None)
    offload_index: dict = {}
    buffers = {name for name, _ in model.named_buffers()}
    loaded, unexpected, wrong_shape = set(), [], []
    for header in headers:
        shard = {}
        for key, tensor in iter_safetensors(header.path, header):
            if family.is_carried(key):  # unused here, written back by save_pretrained as stored
                model.carried_tensors[key] = tensor
                continue
            pieces = family.to_internal_tensors(key, tensor, expected)  # a fused tensor: one piece per part
            if pieces is None or any(internal not in expected for internal, _ in pieces):
                if not family.is_ignored(key):
                    unexpected.append(key)
                continue
            for internal, piece in pieces:
                if tuple(piece.shape) != tuple(expected[internal].shape):
                    wrong_shape.append(f"{key}: checkpoint {tuple(piece.shape)}, model {tuple(expected[internal].shape)}")
                    continue
                target = device if placement is None else _placed_on(placement, internal)
                if target == "disk" and internal in buffers:  # accelerate keeps buffers resident (offload_buffers=False)
                    target = _placed_on(placement, "embed.weight")
                if target == "disk":  # straight to offload_folder in accelerate's format; stays meta in the model
                    from accelerate.utils import offload_weight

                    offload_weight(piece.to(cfg.dtype), internal, str(offload_folder), index=offload_index)
                    loaded.add(internal)
                    continue
                shard[internal] = piece.to(device=target, dtype=cfg.dtype)
        model.load_state_dict(shard, strict=False, assign=True)
        loaded.update(shard)
        del shard
    missing = [family.checkpoint_name(k) for k in expected if k not in loaded]
    if missing or unexpected or wrong_shape:
        problems = [_count_and_name(keys, kind) for keys, kind in
                    ((missing, "missing keys"), (unexpected, "unexpected keys"), (wrong_shape, "wrongly shaped keys"))
                    if keys]
        raise ValueError(
            f"Checkpoint {folder} does not fit the {family.name} adapter's model: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights, or pass adapter=... to choose another family."
        )
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    _apply_bias_sidecar(model, family, folder / BIAS_SIDECAR, device if placement is None else None)
    model.adapter = family
    model.tokenizer = family.load_tokenizer(folder)
    model.checkpoint_folder = folder  # before on_loaded: an adapter may read files beside config.json
    family.on_loaded(model)
    model = model.eval().requires_grad_(False)
    if placement is not None:
        _dispatch(model, placement, offload_folder, offload_index)
    return model


# ----------------------------------------------------------------------------- device maps (accelerate)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(model, device_map, max_memory=None, offload_folder=None) -> dict[str, Union[str, int]]:
    """A checked accelerate device map for the meta model: module name prefix -> device ("cpu", "disk",
    "cuda:1" or a GPU index), covering every weight once, with transformer blocks never split.

    `device_map` is a dict in accelerate's convention ({"embed": 0, "blocks.0": 0, ..., "unembed": 1,
    "" for the whole model}) or a strategy: "auto" / "balanced" (accelerate's `get_balanced_memory` then
    `infer_auto_device_map`, spreading blocks evenly over the GPUs in `max_memory`), "balanced_low_0"
    (GPU 0 kept light, for generation buffers) or "sequential" (fill each device in turn). Modules that
    fit nowhere in `max_memory` go to "cpu", then "disk" (which needs `offload_folder`).

    The embedding must sit on an execution device (not "disk", and not "cpu" beside a GPU, which
    accelerate offloads): it is where inputs go and what `model.W_E.device` reports. A tied LM head
    shares its device.

    Example:
        >>> resolve_device_map(meta_model, "auto", max_memory={0: "20GiB", 1: "20GiB", "cpu": "60GiB"})
        {'embed': 0, 'blocks.0': 0, ..., 'blocks.31': 1, 'ln_final': 1, 'unembed': 1}
    """
    block_classes = sorted({type(block).__name__ for block in model.blocks})
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"device_map={device_map!r} is not a strategy; use one of {DEVICE_MAP_STRATEGIES} or a "
                             "dict of module name -> device ({'embed': 0, 'blocks.0': 0, ..., 'unembed': 1}).")
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        from accelerate.utils.modeling import clean_device_map

        if max_memory is not None and not isinstance(max_memory, dict):
            raise ValueError(f"max_memory must be a dict of device -> size ({{0: '20GiB', 'cpu': '60GiB'}}), got {max_memory!r}.")
        tied = model.cfg.tie_word_embeddings
        if tied:  # accelerate matches tied names by substring ("embed." is in "unembed.weight." and fails):
            # size the map with an empty head, then put the head with the embedding, whose storage it shares
            model.unembed.weight = nn.Parameter(torch.empty(0, device="meta", dtype=model.cfg.dtype), requires_grad=False)
        try:
            if device_map != "sequential":
                max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=block_classes,
                                                 dtype=model.cfg.dtype, low_zero=device_map == "balanced_low_0")
            placement = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=block_classes,
                                                   dtype=model.cfg.dtype, clean_result=False))
        finally:
            if tied:
                model.unembed.weight = model.embed.weight
        if tied:
            placement["unembed"] = _placed_on(placement, "embed.weight")
        placement = dict(clean_device_map(placement))
    elif isinstance(device_map, dict):
        if max_memory is not None:
            raise ValueError("max_memory= sizes the devices for device_map='auto' (or another strategy); with a dict "
                             "device_map every module's device is already given. Drop one of them.")
        placement = {str(name): _device_name(name, value) for name, value in device_map.items()}
    else:
        raise TypeError(f"device_map must be a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) or a dict of module name "
                        f"-> device, got {type(device_map).__name__}.")
    _check_device_map(model, placement, block_classes, offload_folder)
    return placement


def _device_name(name, value) -> Union[str, int]:
    """One device-map value as accelerate takes it: a GPU index (int), "cpu", "disk" or a device string."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"device_map[{name!r}] = {value!r} is not a device; use an int (GPU index), 'cpu', 'disk' "
                         "or a device string such as 'cuda:1'.")
    if isinstance(value, str) and value != "disk":
        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"device_map[{name!r}] = {value!r} is not a device; use an int (GPU index), 'cpu', "
                             "'disk' or a device string such as 'cuda:1'.") from None
    return value


def _check_device_map(model, placement: dict, block_classes: list[str], offload_folder) -> None:
    """Every name a module, no name inside another, every weight placed, blocks whole, the embedding on
    an execution device (with a tied head beside it), and an empty offload folder for "disk"."""
    modules = dict(model.named_modules())
    unknown = [name for name in placement if name not in modules]
    if unknown:
        raise ValueError(
            f"device_map names {_count_and_name(unknown, 'modules this model does not have')}. Names are module "
            f"prefixes such as 'embed', 'blocks.3', 'ln_final', 'unembed' ('' = the whole model); "
            f"this model has blocks.0 ... blocks.{len(model.blocks) - 1}."
        )
    nested = [f"{inner!r} inside {outer!r}" for outer in placement for inner in placement
              if inner != outer and (outer == "" or inner.startswith(outer + "."))]
    if nested:
        raise ValueError(f"device_map places {', '.join(nested[:5])}: give each weight one entry (drop the outer "
                         "name, or list its submodules one by one).")
    unplaced = [name for name in model.state_dict() if _placed_on(placement, name, default=None) is None]
    if unplaced:
        raise ValueError(f"device_map leaves {_count_and_name(unplaced, 'weights')} unplaced; add an entry for "
                         "each of their modules (e.g. 'ln_final': 0).")
    split = [name for name in placement if re.match(r"blocks\.\d+\.", name)]
    if split:
        raise ValueError(f"device_map splits transformer blocks ({', '.join(split[:5])}); a block is placed whole "
                         f"({block_classes} are never split): use 'blocks.3', not 'blocks.3.attn'.")
    accelerators = {str(d) for d in placement.values() if d not in ("cpu", "disk")}
    embed = _placed_on(placement, "embed.weight")
    if embed == "disk" or (embed == "cpu" and accelerators):
        raise ValueError(f"device_map puts 'embed' on {embed!r}, which accelerate offloads; the embedding is where "
                         "inputs go (model.W_E.device), so place it on an execution device"
                         + (f" (one of {sorted(accelerators)})." if accelerators else " ('cpu')."))
    if model.cfg.tie_word_embeddings and _placed_on(placement, "unembed.weight") != embed:
        raise ValueError(f"This model ties its LM head to the embedding (tie_word_embeddings): place 'unembed' on "
                         f"the embedding's device {embed!r}, not {_placed_on(placement, 'unembed.weight')!r}.")
    if "disk" in placement.values():
        if offload_folder is None:
            disk = [name for name, d in placement.items() if d == "disk"]
            raise ValueError(f"device_map puts {_count_and_name(disk, 'modules')} on 'disk'; pass offload_folder= "
                             "(an empty or new folder) to hold their weights.")
        folder = Path(offload_folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ValueError(f"offload_folder={str(folder)!r} exists and is not an empty folder; it receives this "
                             "model's offloaded weights, so pass a new or empty folder.")
        folder.mkdir(parents=True, exist_ok=True)


def _placed_on(placement: dict, name: str, default="error"):
    """The device of weight `name`: its longest module prefix in the map."""
    parts = name.split(".")
    for n in range(len(parts), -1, -1):
        prefix = ".".join(parts[:n])
        if prefix in placement:
            return placement[prefix]
    if default == "error":
        raise KeyError(f"No device_map entry places {name!r}.")
    return default


def _dispatch(model, placement: dict, offload_folder, offload_index: dict) -> None:
    """accelerate's `dispatch_model`: an `AlignDevicesHook` per placed module moves its inputs to its
    device ("cpu"/"disk" modules: a block's weights loaded for its forward), outputs come back to the input's device;
    sets `model.hf_device_map`. A KV cache layer on another device than its block is refused (a moved
    copy would lose the block's writes)."""
    from accelerate import dispatch_model
    from accelerate.utils import save_offload_index

    if offload_index:
        save_offload_index(offload_index, str(offload_folder))
    main = _placed_on(placement, "embed.weight")
    # an offloaded block loads all its weights when it starts (some are read as tensors, not through a
    # submodule's forward: a router's scales) and drops them when it ends
    block_classes = sorted({type(block).__name__ for block in model.blocks})
    dispatch_model(model, placement, main_device=main, offload_dir=str(offload_folder) if offload_index else None,
                   preload_module_classes=block_classes)
    for layer, block in enumerate(model.blocks):
        hook = getattr(block, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            block.register_forward_pre_hook(_KVCacheOnDevice(layer, torch.device(hook.execution_device)),
                                             with_kwargs=True)


class _KVCacheOnDevice:
    """Pre-forward check of a dispatched block: its KV cache layer lives on the block's device."""

    def __init__(self, layer: int, device: torch.device):
        self.layer, self.device = layer, device

    def __call__(self, module, args, kwargs):
        kv = args[3] if len(args) > 3 else kwargs.get("kv")
        if kv is not None and any(t.device != self.device for t in kv):
            raise RuntimeError(
                f"blocks.{self.layer} runs on {self.device} but its KV cache layer is on {kv[0].device}; a copy moved "
                "there would not keep the block's writes. Allocate each layer's keys and values on its block's "
                "device (model.hf_device_map)."
            )
        return None


def _meta_model(model_cls, cfg):
    """The model `cfg` describes, on the meta device: its parameter names and shapes, no memory."""
    with torch.device("meta"), _SkipInit():
        return model_cls(cfg)


def _config_from(family: ModelAdapter, config_json: dict, folder: Path, forced: bool):
    """`family.to_config`, with config.json's path in the error and, for a forced adapter, the family
    the config looks like."""
    try:
        return family.to_config(config_json)
    except ValueError as error:
        hint = ""
        if forced:
            try:
                detected = detect_adapter(config_json).name
            except ValueError:
                detected = None
            if detected not in (None, family.name):
                hint = f" This config.json looks like a {detected} checkpoint, and adapter={family.name!r} was forced."
        raise ValueError(f"{folder / 'config.json'}: {error}{hint}") from error


def _apply_bias_sidecar(model, family: ModelAdapter, path: Path, device) -> None:
    """Give each linear layer named in the sidecar written by `save_pretrained` its folded bias.

    A sidecar tensor is named after the checkpoint key of the layer's weight, with ".bias" for
    ".weight" (e.g. LLaDA `model.transformer.blocks.3.ff_out.bias`): y = W x + b for that W.
    """
    if not path.is_file():
        return
    for key, tensor in iter_safetensors(path):
        weight = family.to_internal_key(key.removesuffix(".bias") + ".weight") if key.endswith(".bias") else None
        try:
            linear = model.get_submodule(weight.removesuffix(".weight")) if weight else None
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear) or linear.bias is not None or tuple(tensor.shape) != (linear.out_features,):
            raise ValueError(
                f"{path}: {key!r} is not the bias of a bias-free linear layer of this {family.name} model "
                f"(shape {tuple(tensor.shape)}). The sidecar holds folded biases for the checkpoint beside it; "
                "delete it to load the checkpoint without them."
            )
        if device is None and linear.weight.device.type == "meta":
            raise ValueError(
                f"{path}: {key!r} is a folded bias of a layer that device_map offloads to disk; place that layer's "
                "block on a device (or 'cpu'), or delete the sidecar to load the checkpoint without its biases."
            )
        target = linear.weight.device if device is None else device
        linear.bias = nn.Parameter(tensor.to(device=target, dtype=linear.weight.dtype), requires_grad=False)


def save_pretrained(model, path, *, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write `model` in its family's original checkpoint format, atomically.

    Weights the family's format has no key for (biases that `steering.fold` created, e.g. on
    LLaDA's bias-free layers) go to a sidecar `diffusion_lens_biases.safetensors`, named after the
    checkpoint key of the layer's weight with ".bias" (y = W x + b); `from_pretrained` applies it,
    upstream code that reads only the checkpoint gets the model without those biases (a warning says so).

    Atomic: everything is written into a temporary folder beside `path`, which then takes its place;
    a failure leaves no `path` (or the old one untouched). An existing `path` is replaced only if it
    is empty or holds a config.json (a checkpoint), never a folder of other files.

    Example:
        >>> fold(model, mean_act_map)                 # creates biases LLaDA's format cannot hold
        >>> model.save_pretrained("steered-llada")    # model.safetensors + diffusion_lens_biases.safetensors
    """
    if model.adapter is None:
        raise ValueError(
            "This model was not loaded through an adapter, so its original format is unknown; set "
            "model.adapter = diffusion_lens.checkpoints.adapters.get_adapter('llada') (or another family) first."
        )
    folder = Path(path)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / "config.json").is_file())):
        raise FileExistsError(
            f"{folder} exists and is not an empty folder or a checkpoint folder (no config.json); save_pretrained "
            "replaces a folder as a whole, so pass a new path or an empty folder."
        )
    offloaded = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{_count_and_name(offloaded, 'weights')} are offloaded by device_map (meta placeholders; accelerate holds "
            "the stored copies), so this model cannot be saved as a whole. Load it with every module on a device or "
            "'cpu' (device_map={'': 'cpu'} or device='cpu') to save it."
        )
    tensors, biases = _checkpoint_tensors(model)
    config = model.adapter.to_checkpoint_config(model.cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(folder, "saving")
    staging.mkdir()
    try:
        _write_checkpoint(model, staging, tensors, biases, config, max_shard_bytes)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if biases:
        warnings.warn(
            f"{len(biases)} folded biases have no key in the {model.adapter.name} checkpoint format; they were "
            f"written to {folder / BIAS_SIDECAR}, which from_pretrained applies. Upstream code that reads only "
            "the checkpoint loads the model without them.",
            stacklevel=3,
        )
    return folder


def _checkpoint_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(checkpoint key -> tensor, sidecar key -> bias), or a clear error for a weight neither can hold.

    A weight goes to the checkpoint if the model that the written config.json describes has it
    (e.g. LLaDA's v_proj.bias only with include_qkv_bias); a bias that `fold` added elsewhere goes
    to the sidecar, named after its layer's checkpoint weight key.
    """
    state = model.state_dict()
    if model.cfg.tie_word_embeddings:
        state.pop("unembed.weight", None)
    architecture = set(_meta_model(type(model), model.cfg).state_dict())
    adapter = model.adapter
    # parts of a fused checkpoint tensor (a fused QKV) leave `in_format` and are written stacked
    in_format = {name: state.pop(name) for name in list(state) if name in architecture}
    fused = adapter.fuse_checkpoint_tensors(in_format)
    state.update(in_format)
    tensors, biases, unmapped = {key: value.detach().contiguous().cpu() for key, value in fused.items()}, {}, []
    for name, value in state.items():
        value = value.detach().contiguous().cpu()
        key = _checkpoint_key(adapter, name) if name in architecture else None
        weight_key = None
        layer = name.removesuffix(".bias")
        if name not in architecture and name != layer and isinstance(model.get_submodule(layer), nn.Linear):
            weight_key = _checkpoint_key(adapter, layer + ".weight")
        if key is not None:
            tensors[key] = value
        elif weight_key is not None and weight_key.endswith(".weight"):
            biases[weight_key.removesuffix(".weight") + ".bias"] = value
        else:
            unmapped.append(name)
    tensors.update(model.carried_tensors)
    if unmapped:
        raise KeyError(
            f"The {adapter.name} checkpoint format has no key for {_count_and_name(unmapped, 'weights')}, and they "
            "are not biases added to one of its linear layers; nothing was written. Keep this model in memory."
        )
    return tensors, biases


def _checkpoint_key(adapter: ModelAdapter, name: str) -> Optional[str]:
    try:
        return adapter.to_checkpoint_key(name)
    except KeyError:
        return None


def _write_checkpoint(model, folder: Path, tensors: dict, biases: dict, config: dict, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if biases:
        note = "y = W x + b for the checkpoint weight named like each key with .weight for .bias"
        save_file(biases, folder / BIAS_SIDECAR, metadata={"format": BIAS_SIDECAR_FORMAT, "applies": note})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    source = getattr(model, "checkpoint_folder", None)
    if source is not None and (Path(source) / "generation_config.json").is_file():
        (folder / "generation_config.json").write_text((Path(source) / "generation_config.json").read_text())


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move the finished `staging` folder to `folder`; an existing `folder` is swapped out, then deleted."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    old = _sibling(folder, "old")
    os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sibling(folder: Path, role: str) -> Path:
    """An unused hidden path next to `folder`: on the same file system, so renames are atomic."""
    return folder.parent / f".{folder.name}.{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
