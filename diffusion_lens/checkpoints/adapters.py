"""The adapter contract: how a model family's checkpoint maps onto the core model.

An adapter only *translates*: config.json <-> `DiffusionConfig`, checkpoint key <-> internal key,
plus the family's sampler defaults. Adapters live in `model_adapters/`, one module per family, and
register themselves with `@register_adapter`. The core never imports a family by name.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from diffusion_lens.core.config import DiffusionConfig


@dataclass(frozen=True)
class KeyRule:
    """One checkpoint <-> internal key correspondence; `{l}` (layer) and `{e}` (expert) are integers.

    Example: KeyRule("model.transformer.blocks.{l}.q_proj.weight", "blocks.{l}.attn.q_proj.weight")
    """

    checkpoint: str
    internal: str

    def _pattern(self, template: str) -> re.Pattern:
        escaped = re.escape(template).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile(escaped + r"\Z")

    def convert(self, key: str, to_internal: bool) -> Optional[str]:
        source, target = (self.checkpoint, self.internal) if to_internal else (self.internal, self.checkpoint)
        match = self._pattern(source).match(key)
        return target.format(**match.groupdict()) if match else None


@dataclass(frozen=True)
class FusedKeyRule:
    """One checkpoint tensor holding several internal weights stacked along dim 0, in order (a fused
    QKV projection); the split sizes are the model's own weight shapes.

    Example: FusedKeyRule("model.layers.{l}.attention.query_key_value.weight",
                          ("blocks.{l}.attn.q_proj.weight", "blocks.{l}.attn.k_proj.weight", "blocks.{l}.attn.v_proj.weight"))
    """

    checkpoint: str
    internals: tuple[str, ...]

    def internal_keys(self, key: str) -> Optional[tuple[str, ...]]:
        """The internal keys of checkpoint key `key`, in stacking order; None if the rule does not match."""
        parts = tuple(KeyRule(self.checkpoint, part).convert(key, to_internal=True) for part in self.internals)
        return None if parts[0] is None else parts

    def checkpoint_key(self, internal: str) -> Optional[str]:
        """The fused checkpoint key holding internal key `internal` (any part); None if it is no part."""
        for part in self.internals:
            key = KeyRule(self.checkpoint, part).convert(internal, to_internal=False)
            if key is not None:
                return key
        return None


class ModelAdapter:
    """Base class of a family adapter. Subclasses set `name`, `key_rules` and implement the hooks below."""

    name: ClassVar[str]
    key_rules: ClassVar[tuple[KeyRule, ...]]
    # Checkpoint tensors split into several internal weights on load and stacked again on save.
    fused_key_rules: ClassVar[tuple[FusedKeyRule, ...]] = ()
    # Checkpoint keys that exist upstream but carry nothing the model needs (e.g. rotary caches).
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    # Checkpoint keys (regexes) the model does not use but `save_pretrained` must write back unchanged
    # (e.g. DiffusionGemma's vision tower): kept aside in `model.carried_tensors`, as stored.
    carried_checkpoint_keys: ClassVar[tuple[str, ...]] = ()

    # config.json, declared per family and checked by `read` (one place for every family):
    # the upstream config class's defaults, used for absent keys;
    config_defaults: ClassVar[dict] = {}
    # keys that must be present, because a class default would silently build a different model
    # (a tuple of names = any one of them, e.g. ("mlp_hidden_size", "mlp_ratio"));
    required_config_keys: ClassVar[tuple[Union[str, tuple[str, ...]], ...]] = ()
    # keys that change the math -> the values this library implements (others are an error);
    supported_config_values: ClassVar[dict[str, tuple]] = {}
    # keys upstream's modeling code ignores too (or that act only in training) -> their neutral
    # values; another value loads, listed in one warning so that nobody expects it to act.
    inert_config_values: ClassVar[dict[str, tuple]] = {}

    def matches(self, config: dict) -> bool:
        """True if this adapter reads a checkpoint with this config.json."""
        raise NotImplementedError

    def to_config(self, config: dict) -> DiffusionConfig:
        """config.json -> DiffusionConfig. Must read every key that changes the math and reject
        values it does not implement: start from `self.read(config)`, which checks the declared
        lists; raise `unsupported(...)` for checks that relate several keys."""
        raise NotImplementedError

    def read(self, config: dict) -> dict:
        """config.json checked against this family's declared lists, completed with `config_defaults`.

        Why: a missing `d_model` must not become the config class's 768, and a `rope_scaling` we do
        not implement must not be dropped: either would load a different model without a word.

        Example:
            >>> get_adapter("llada").read({"model_type": "llada", "n_layers": 2})
            ValueError: llada config.json lacks required keys ['d_model', 'n_heads', ...] ...
        """
        absent = [key for key in self.required_config_keys
                  if not any(name in config for name in ((key,) if isinstance(key, str) else key))]
        if absent:
            names = [key if isinstance(key, str) else " or ".join(key) for key in absent]
            raise ValueError(
                f"{self.name} config.json lacks required keys {names}; upstream's config class would fill "
                "them with defaults that do not describe these weights. Add them from the checkpoint's "
                "original config.json."
            )
        values = {**self.config_defaults, **config}
        for key, allowed in self.supported_config_values.items():
            if values.get(key) not in allowed:
                raise unsupported(self.name, key, values.get(key), allowed)
        inert = {key: config[key] for key, neutral in self.inert_config_values.items()
                 if key in config and config[key] not in neutral}
        if inert:
            warnings.warn(
                f"{self.name} config.json sets {inert}; upstream's modeling code ignores these keys at inference "
                "too, so they change nothing here either.",
                stacklevel=2,
            )
        return values

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        """DiffusionConfig -> the family's original config.json contents."""
        raise NotImplementedError

    def load_tokenizer(self, folder) -> "object":
        """The checkpoint's tokenizer, or None when the folder has none.

        Why: some families ship a remote-code tokenizer class (Dream's `DreamTokenizer`) that
        `AutoTokenizer` refuses without `trust_remote_code`; their adapter overrides this to build
        the equivalent built-in class. Default: `AutoTokenizer`, never running checkpoint code.

        Example:
            >>> tokenizer = get_adapter("llada").load_tokenizer(Path("LLaDA-8B-Instruct"))
        """
        folder = Path(folder)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            return None
        # AutoTokenizer reads config.json too and warns that transformers does not know our
        # model_type ("llada", ...) or that a model key is deprecated there (LLaDA-MoE's
        # `rope_scaling`); both are expected here, since only the tokenizer is wanted.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.configuration_utils")
                return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(verbosity)

    def sampler(self, cfg: DiffusionConfig) -> "object":
        """The family's reference sampler with upstream defaults (see `diffusion_lens.denoising`).

        Why: `generate` runs it when no `sampler=` is given; samplers see only the config (token ids).

        Example:
            >>> model.adapter.sampler(model.cfg)
            LLaDASampler(steps=128, gen_length=128, ...)
        """
        raise NotImplementedError(f"The {self.name} adapter does not define a sampler.")

    def on_loaded(self, model) -> None:
        """Called by `from_pretrained` once weights and tokenizer are in place; fills config facts
        only the tokenizer knows (e.g. `cfg.eot_token_id` from the end-of-turn token). Default: nothing.

        Example:
            >>> model = HookedDiffusionTransformer.from_pretrained("GSAI-ML/LLaDA-8B-Instruct")
            >>> model.cfg.eot_token_id  # 126348, set by the LLaDA adapter's on_loaded
        """

    # -- key mapping, shared by every adapter
    def to_internal_key(self, key: str) -> Optional[str]:
        for rule in self.key_rules:
            converted = rule.convert(key, to_internal=True)
            if converted is not None:
                return converted
        return None

    def to_checkpoint_key(self, key: str) -> str:
        for rule in self.key_rules:
            converted = rule.convert(key, to_internal=False)
            if converted is not None:
                return converted
        raise KeyError(f"The {self.name} adapter has no checkpoint name for internal weight {key!r}.")

    def to_internal_tensors(self, key: str, tensor, shapes: dict) -> Optional[list[tuple[str, "object"]]]:
        """[(internal key, tensor)] for one checkpoint tensor, a fused one split along dim 0 by the
        first-dim sizes of its parts in `shapes` (internal key -> the model's tensor); None if unknown.

        Example:
            >>> adapter.to_internal_tensors("model.layers.0.attention.query_key_value.weight", qkv, model.state_dict())
            [('blocks.0.attn.q_proj.weight', ...), ('blocks.0.attn.k_proj.weight', ...), ...]
        """
        internal = self.to_internal_key(key)
        if internal is not None:
            return [(internal, tensor)]
        for rule in self.fused_key_rules:
            parts = rule.internal_keys(key)
            if parts is None or not all(part in shapes for part in parts):
                continue
            sizes = [shapes[part].shape[0] for part in parts]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"Checkpoint tensor {key!r} has {tensor.shape[0]} rows; this model stacks {list(parts)} "
                                 f"of {sizes} rows there. Check that config.json belongs to these weights.")
            return list(zip(parts, tensor.split(sizes)))
        return None

    def fuse_checkpoint_tensors(self, state: dict) -> dict:
        """Take every complete group of fused parts out of `state` (internal key -> tensor) and return
        them stacked under their checkpoint keys (the inverse of `to_internal_tensors`).

        Example:
            >>> fused = adapter.fuse_checkpoint_tensors(state)   # state loses q/k/v_proj, fused gains query_key_value
        """
        fused = {}
        for rule in self.fused_key_rules:
            for key in {rule.checkpoint_key(name) for name in state} - {None}:
                parts = rule.internal_keys(key)
                if all(part in state for part in parts):
                    fused[key] = torch.cat([state.pop(part) for part in parts])
        return fused

    def checkpoint_name(self, internal: str) -> str:
        """The checkpoint key holding an internal weight (a fused key for a part), for messages."""
        for rule in self.fused_key_rules:
            key = rule.checkpoint_key(internal)
            if key is not None:
                return f"{key} (its {internal} part)"
        return self.to_checkpoint_key(internal)

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignored_checkpoint_keys)

    def is_carried(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.carried_checkpoint_keys)


def unsupported(adapter: str, key: str, value, supported) -> ValueError:
    return ValueError(
        f"{adapter} checkpoint has {key}={value!r}, which diffusion_lens does not implement "
        f"(supported: {supported}). Open an issue with the checkpoint id if you need it."
    )


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter available to `from_pretrained` (by detection or `adapter=`)."""
    _REGISTRY[cls.name] = cls()
    return cls


def registered_adapters() -> dict[str, ModelAdapter]:
    """Every registered family by name (the shipped ones register when `diffusion_lens` is imported)."""
    return dict(_REGISTRY)


def get_adapter(name: str) -> ModelAdapter:
    adapters = registered_adapters()
    if name not in adapters:
        raise KeyError(f"No adapter named {name!r}; registered adapters: {sorted(adapters)}.")
    return adapters[name]


def detect_adapter(config: dict) -> ModelAdapter:
    """The one registered adapter whose `matches` accepts this config.json."""
    adapters = registered_adapters()
    found = [adapter for adapter in adapters.values() if adapter.matches(config)]
    if len(found) == 1:
        return found[0]
    seen = {key: config.get(key) for key in ("model_type", "architectures")}
    if not found:
        raise ValueError(
            f"No adapter recognises this config.json ({seen}); registered adapters: {sorted(adapters)}. "
            "Pass adapter=... to force one, or add an adapter (docs/adding_a_model.md)."
        )
    raise ValueError(
        f"Several adapters claim this config.json ({seen}): {[a.name for a in found]}; pass adapter=... to choose."
    )
