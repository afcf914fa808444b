"""Checkpoint I/O: resolve a name to a folder, stream safetensors shards into a meta-initialised
model, and write a model back in its family's original format.

Only `*.json`, `*.safetensors` and tokenizer files are ever read from a checkpoint folder; Python
files there (`modeling_*.py`, `configuration_*.py`) are never imported.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from diffusion_lens.adapters import ModelAdapter, detect_adapter, get_adapter

EMBEDDED_DIR = Path(__file__).parent / "pretrained"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.md"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
    return json.loads(config_path.read_text())


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards, in index order when there is an index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is missing shards listed in its index: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("golden")]
    if not files:
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights (diffusion_lens reads safetensors only; convert "
            ".bin/.pt checkpoints with safetensors.torch.save_file first)."
        )
    return files


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time with plain reads (no mmap), so a shard never sits
    in memory beside the tensors already loaded."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(base + start)
            if end > start:
                f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            yield name, tensor


def _checkpoint_dtype(files: list[Path]) -> torch.dtype:
    with open(files[0], "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    floats = [_SAFETENSORS_DTYPES[v["dtype"]] for v in header.values() if v["dtype"].startswith(("F", "BF"))]
    return floats[0] if floats else torch.float32


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


def load_pretrained(model_cls, name_or_path, *, dtype=None, device="cpu", adapter=None, revision=None):
    folder = resolve_checkpoint(name_or_path, revision)
    config_json = read_config(folder)
    family: ModelAdapter = get_adapter(adapter) if adapter else detect_adapter(config_json)
    files = checkpoint_files(folder)
    cfg = family.to_config(config_json)
    cfg.dtype = dtype or _checkpoint_dtype(files)
    cfg.model_name = str(name_or_path)

    with torch.device("meta"), _SkipInit():
        model = model_cls(cfg)
    expected = {name: param for name, param in model.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        expected.pop("unembed.weight", None)
    loaded, unexpected, wrong_shape = set(), [], []
    for file in files:
        shard = {}
        for key, tensor in iter_safetensors(file):
            internal = family.to_internal_key(key)
            if internal is None or internal not in expected:
                if not family.is_ignored(key):
                    unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(expected[internal].shape):
                wrong_shape.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[internal].shape)}")
                continue
            shard[internal] = tensor.to(device=device, dtype=cfg.dtype)
        model.load_state_dict(shard, strict=False, assign=True)
        loaded.update(shard)
        del shard
    missing = [family.to_checkpoint_key(k) for k in expected if k not in loaded]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if wrong_shape:
            problems.append(f"wrongly shaped keys {wrong_shape}")
        raise ValueError(
            f"Checkpoint {folder} does not fit the {family.name} adapter's model: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights, or pass adapter=... to choose another family."
        )
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    model.adapter = family
    model.tokenizer = family.load_tokenizer(folder)
    family.on_loaded(model)
    model.checkpoint_folder = folder
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer through `AutoTokenizer`, or None if the folder has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json too and warns that transformers does not know our
    # model_type ("llada", ...); that is expected here, since only the tokenizer is wanted.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)


def save_pretrained(model, path, *, max_shard_bytes: int = 4 * 2**30) -> Path:
    if model.adapter is None:
        raise ValueError(
            "This model was not loaded through an adapter, so its original format is unknown; set "
            "model.adapter = diffusion_lens.adapters.get_adapter('llada') (or another family) first."
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.cfg.tie_word_embeddings:
        state.pop("unembed.weight", None)
    tensors = {model.adapter.to_checkpoint_key(k): v.detach().contiguous().cpu() for k, v in state.items()}
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
    config = model.adapter.to_checkpoint_config(model.cfg)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    source = getattr(model, "checkpoint_folder", None)
    if source is not None and (Path(source) / "generation_config.json").is_file():
        (folder / "generation_config.json").write_text((Path(source) / "generation_config.json").read_text())
    return folder
