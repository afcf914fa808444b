"""Shared helpers for the benchmarks: random LLaDA-format weights, our model built from them, and the
same weights in `transformers.LlamaForCausalLM` run bidirectionally as an independent reference.

A LLaDA "llama" block is a Llama decoder layer (pre-norm RMSNorm, half-split RoPE, SwiGLU, no
biases); the only difference is that LLaDA attention is bidirectional. LLaDA-V renames LLaDA
checkpoints to Llama keys (docs/families/llada.md, section "Checkpoint keys"); `LLADA_TO_LLAMA`
is that renaming. With an all-True 4D boolean attention mask, `LlamaForCausalLM` computes the
LLaDA forward (see `BidirectionalReference`): it reproduces the golden logits that upstream LLaDA
code recorded for tests/fixtures/llada-tiny-mha exactly, and matches our model to ~4e-6 in fp32.

Typical use (other benches import this module, e.g. `from _reference import ...` after putting
`bench/` on sys.path, which running `python bench/<name>.py` does):

    >>> shape = ModelShape(n_layers=4, d_model=256, n_heads=4, d_mlp=768, vocab=4096)
    >>> ours, ref = build_pair(shape, seed=0)           # same random weights in both
    >>> tokens = random_tokens(shape, batch=4, n_pos=128)
    >>> max_abs_diff(ours(tokens), ref(tokens))          # ~4e-6 in fp32

    >>> folder = write_llada_checkpoint(tmp, shape, dtype=torch.bfloat16, n_shards=2)
    >>> HookedDiffusionTransformer.from_pretrained(folder)

How transformers 5.23 treats a 4D `attention_mask` (read from the installed source:
`masking_utils._preprocess_mask_arguments`, `integrations/sdpa_attention.py`):
  * `create_causal_mask` returns any 4D tensor unchanged ("already prepared"): no causal mask is
    added, whatever `LlamaAttention.is_causal` says.
  * `sdpa_attention_forward` then sets `is_causal = q_len > 1 and attention_mask is None and ...`,
    i.e. False, and passes the mask straight to `F.scaled_dot_product_attention`.
  * So a *boolean* mask means True = may attend, and a *float* mask is ADDITIVE (0 = attend,
    -inf / finfo.min = blocked). An all-ones float mask is therefore not "attend to everything"
    by meaning but only by accident (softmax is shift invariant; it still adds rounding). We use
    an all-True boolean mask [batch, 1, q_pos, k_pos].
  * With a mask present, GQA models go through `repeat_kv` (expanded K/V) on CPU and CUDA, not
    SDPA's `enable_gqa`; the result is the same.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable, Optional, Union

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # `python bench/x.py` puts bench/ (not the repo root) first on sys.path; the editable install
    # alone may resolve `model_adapters` as a namespace package without registering the adapters.
    sys.path.insert(0, str(REPO_ROOT))

from diffusion_lens import HookedDiffusionTransformer  # noqa: E402

__all__ = [
    "ModelShape", "LLADA_TO_LLAMA", "llada_config_json", "shape_from_llada_config",
    "read_llada_checkpoint", "random_llada_state_dict", "write_llada_checkpoint", "write_shards",
    "diffusion_gemma_tensor_shapes", "write_diffusion_gemma_checkpoint", "build_model",
    "llada_to_llama_key", "llama_config",
    "build_reference", "BidirectionalReference", "build_pair", "random_tokens", "max_abs_diff",
    "available_threads", "time_interleaved", "TimingResult",
]


# --------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """Architecture of a random LLaDA-8B-style model ("llama" blocks, RMSNorm, RoPE, no biases).

    `n_kv_heads=None` means MHA (n_kv_heads = n_heads). `vocab` is both `vocab_size` and
    `embedding_size` (rows of the embedding and of the untied LM head).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab: int
    n_kv_heads: Optional[int] = None
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.kv_heads)
        block = attn + 3 * self.d_model * self.d_mlp + 2 * self.d_model
        return self.n_layers * block + 2 * self.vocab * self.d_model + self.d_model

    def describe(self) -> str:
        kv = "" if self.kv_heads == self.n_heads else f"/{self.kv_heads}kv"
        return (f"{self.n_layers}L d{self.d_model} {self.n_heads}h{kv} mlp{self.d_mlp} "
                f"vocab{self.vocab} ({self.n_params / 1e6:.1f}M params)")


# ------------------------------------------------------------------ LLaDA-format checkpoint
def llada_config_json(shape: ModelShape, *, mask_token_id: Optional[int] = None) -> dict:
    """A complete LLaDA `config.json` (every key that changes the math spelled out, as in the
    8B Instruct checkpoint) for `shape`. Special ids are placed at the top of the vocabulary."""
    v = shape.vocab
    mask_id = v - 1 if mask_token_id is None else mask_token_id
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
        "n_kv_heads": shape.kv_heads, "multi_query_attention": None,
        "mlp_hidden_size": shape.d_mlp, "mlp_ratio": 4,
        "vocab_size": v, "embedding_size": v,
        "block_type": "llama", "block_group_size": 1, "activation_type": "silu",
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "bias_for_layer_norm": False,
        "rms_norm_eps": shape.rms_norm_eps, "include_bias": False, "include_qkv_bias": False,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "rope": True, "rope_theta": shape.rope_theta, "rope_full_precision": True,
        "alibi": False, "alibi_bias_max": 8.0, "flash_attention": False,
        "max_sequence_length": 4096, "weight_tying": False, "scale_logits": False,
        "input_emb_norm": False, "attention_dropout": 0.0, "residual_dropout": 0.0,
        "embedding_dropout": 0.0, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
        "init_cutoff_factor": None, "precision": "amp_bf16", "use_cache": False,
        "mask_token_id": mask_id, "eos_token_id": v - 2, "pad_token_id": v - 2,
    }


def shape_from_llada_config(config: dict) -> ModelShape:
    """The `ModelShape` of an existing LLaDA config.json (e.g. a test fixture), read through our
    LLaDA adapter so absent keys get the upstream config-class defaults."""
    from diffusion_lens.checkpoints.adapters import get_adapter

    cfg = get_adapter("llada").to_config(config)
    if cfg.d_vocab != cfg.d_vocab_out or cfg.tie_word_embeddings or cfg.qkv_bias:
        raise ValueError("ModelShape covers untied, bias-free LLaDA models with embedding_size == vocab_size")
    return ModelShape(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_mlp=cfg.d_mlp,
        vocab=cfg.d_vocab_out, n_kv_heads=cfg.n_key_value_heads, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
    )


def read_llada_checkpoint(folder: Union[str, Path]) -> tuple[ModelShape, dict[str, Tensor]]:
    """(shape, LLaDA-keyed state dict) of a LLaDA checkpoint folder (single or sharded)."""
    from safetensors.torch import load_file

    from diffusion_lens.checkpoints.loading import checkpoint_files, read_config

    folder = Path(folder)
    state_dict = {}
    for file in checkpoint_files(folder):
        state_dict.update(load_file(file))
    return shape_from_llada_config(read_config(folder)), state_dict


def _llada_tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    d, kv = shape.d_model, shape.kv_heads * shape.d_head
    shapes = {"model.transformer.wte.weight": (shape.vocab, d)}
    for layer in range(shape.n_layers):
        p = f"model.transformer.blocks.{layer}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "q_proj.weight": (shape.n_heads * shape.d_head, d),
            p + "k_proj.weight": (kv, d), p + "v_proj.weight": (kv, d),
            p + "attn_out.weight": (d, shape.n_heads * shape.d_head), p + "ff_norm.weight": (d,),
            p + "ff_proj.weight": (shape.d_mlp, d), p + "up_proj.weight": (shape.d_mlp, d),
            p + "ff_out.weight": (d, shape.d_mlp),
        })
    shapes["model.transformer.ln_f.weight"] = (d,)
    shapes["model.transformer.ff_out.weight"] = (shape.vocab, d)
    return shapes


def random_llada_state_dict(
    shape: ModelShape, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Tensor]:
    """Random weights under LLaDA checkpoint key names. Matrices ~ N(0, 1/fan_in) so activations
    and logits stay O(1) through the layers; norm weights ~ 1 + N(0, 0.1) so they matter."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, dims in _llada_tensor_shapes(shape).items():
        if len(dims) == 1:
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen)
        elif key.endswith("wte.weight"):
            t = torch.randn(dims, generator=gen)
        else:
            t = torch.randn(dims, generator=gen) / dims[1] ** 0.5
        out[key] = t.to(dtype)
    return out


def write_llada_checkpoint(
    folder: Union[str, Path],
    shape: ModelShape,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_shards: int = 1,
    state_dict: Optional[dict[str, Tensor]] = None,
) -> Path:
    """Write config.json + safetensors weights in the LLaDA format to `folder` and return it.

    With `n_shards > 1` the tensors are split into roughly equal-sized shards
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as on the hub.
    Tensors are generated one shard at a time, so peak memory is about one shard. The random values
    follow `random_llada_state_dict`'s distributions but are not the same draws; pass
    `state_dict` (LLaDA keys) to write given weights instead.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llada_config_json(shape), indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)

    def tensor(key: str, dims: tuple[int, ...]) -> Tensor:
        if state_dict is not None:
            return state_dict[key].to(dtype).contiguous()
        # Drawn straight in `dtype` (no fp32 copy); same distributions as random_llada_state_dict.
        if len(dims) == 1:
            return torch.empty(dims, dtype=dtype).normal_(1.0, 0.1, generator=gen)
        std = 1.0 if key.endswith("wte.weight") else dims[1] ** -0.5
        return torch.empty(dims, dtype=dtype).normal_(0.0, std, generator=gen)

    write_shards(folder, _llada_tensor_shapes(shape), tensor, dtype=dtype, n_shards=n_shards)
    return folder


def write_shards(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    tensor: Callable[[str, tuple[int, ...]], Tensor],
    *,
    dtype: torch.dtype,
    n_shards: int,
) -> None:
    """Write the tensors `shapes` names (key -> dims, in file order), made one shard at a time by
    `tensor(key, dims)`, as `n_shards` roughly equal safetensors files plus
    `model.safetensors.index.json` (one `model.safetensors` if n_shards == 1). Peak memory is about
    one shard.

    Example:
        >>> write_shards(folder, {"w": (4, 4)}, lambda key, dims: torch.zeros(dims), dtype=torch.float32, n_shards=1)
    """
    from safetensors.torch import save_file

    sizes = {k: dtype.itemsize * int(torch.Size(s).numel()) for k, s in shapes.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    filled = 0
    for key in shapes:  # greedy split into n_shards contiguous groups
        if groups[-1] and len(groups) < n_shards and filled >= total * len(groups) / n_shards:
            groups.append([])
        groups[-1].append(key)
        filled += sizes[key]
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        tensors = {key: tensor(key, shapes[key]) for key in keys}
        name = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------- DiffusionGemma-format checkpoint
def diffusion_gemma_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> dims of a `DiffusionGemmaConfig`, as transformers' `save_pretrained` writes
    them: the state dict of `DiffusionGemmaForBlockDiffusion` built on the meta device, less its tied
    keys (`lm_head.weight` and the encoder's text weights, which are the decoder's). So the text
    weights appear once under `model.decoder.*`, each pass keeps its own `layer_scalar`, and the
    vision tower (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`) is there too.

    Example:
        >>> shapes = diffusion_gemma_tensor_shapes(DiffusionGemmaConfig.from_pretrained(fixture))
        >>> shapes["model.decoder.layers.0.experts.gate_up_proj"]   # fused experts: (4, 64, 64)
    """
    from transformers import DiffusionGemmaForBlockDiffusion  # the reference implementation (heavy import)

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    tied = set(model.all_tied_weights_keys)
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in tied}


def write_diffusion_gemma_checkpoint(
    folder: Union[str, Path],
    text: dict,
    vision: dict,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    n_shards: int = 2,
    canvas_length: int = 32,
) -> Path:
    """Write a random `DiffusionGemmaForBlockDiffusion` checkpoint to `folder` and return it:
    config.json from transformers' `DiffusionGemmaConfig(text_config=text, vision_config=vision)`,
    and the tensors `diffusion_gemma_tensor_shapes` lists, in `dtype`, over `n_shards` shards.

    The tensors are drawn one shard at a time (peak memory about one shard, not the model): 1-D
    tensors (norms, layer and router scalars) ~ 1 + N(0, 0.1), embedding tables ~ N(0, 1), every other
    tensor ~ N(0, 1 / last dim). Key names and shapes come from transformers itself, so its
    `from_pretrained` loads the folder with no missing or unexpected key.

    Example:
        >>> text = json.loads((fixture / "config.json").read_text())["text_config"]
        >>> write_diffusion_gemma_checkpoint(tmp, text, vision, n_shards=2)
        >>> HookedDiffusionTransformer.from_pretrained(tmp, dtype=torch.bfloat16)
    """
    from transformers import DiffusionGemmaConfig  # the reference implementation (heavy import)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length)
    config.dtype = dtype
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)

    def tensor(key: str, dims: tuple[int, ...]) -> Tensor:
        if len(dims) == 1:
            return torch.empty(dims, dtype=dtype).normal_(1.0, 0.1, generator=gen)
        std = 1.0 if "embed_tokens" in key else dims[-1] ** -0.5
        return torch.empty(dims, dtype=dtype).normal_(0.0, std, generator=gen)

    write_shards(folder, diffusion_gemma_tensor_shapes(config), tensor, dtype=dtype, n_shards=n_shards)
    return folder


# ---------------------------------------------------------------------------------- our model
def build_model(
    shape: ModelShape,
    *,
    state_dict: Optional[dict[str, Tensor]] = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> HookedDiffusionTransformer:
    """Our model with `state_dict` (LLaDA keys; random from `seed` if None), built in memory the way
    `from_pretrained` would build it from a folder: same adapter config, same key mapping."""
    from diffusion_lens.checkpoints.adapters import get_adapter

    adapter = get_adapter("llada")
    state_dict = state_dict if state_dict is not None else random_llada_state_dict(shape, seed=seed)
    cfg = adapter.to_config(llada_config_json(shape))
    cfg.dtype = dtype
    cfg.model_name = f"random-llada {shape.describe()}"
    with torch.device("meta"):
        model = HookedDiffusionTransformer(cfg)
    internal = {adapter.to_internal_key(k): v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(internal, strict=True, assign=True)
    model.adapter = adapter
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------- reference
LLADA_TO_LLAMA: tuple[tuple[str, str], ...] = (
    # LLaDA-V's rename_checkpoint.py: LLaDA checkpoint key -> HF Llama key ({l} = layer).
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.blocks.{l}.attn_norm.weight", "model.layers.{l}.input_layernorm.weight"),
    ("model.transformer.blocks.{l}.q_proj.weight", "model.layers.{l}.self_attn.q_proj.weight"),
    ("model.transformer.blocks.{l}.k_proj.weight", "model.layers.{l}.self_attn.k_proj.weight"),
    ("model.transformer.blocks.{l}.v_proj.weight", "model.layers.{l}.self_attn.v_proj.weight"),
    ("model.transformer.blocks.{l}.attn_out.weight", "model.layers.{l}.self_attn.o_proj.weight"),
    ("model.transformer.blocks.{l}.ff_norm.weight", "model.layers.{l}.post_attention_layernorm.weight"),
    ("model.transformer.blocks.{l}.ff_proj.weight", "model.layers.{l}.mlp.gate_proj.weight"),
    ("model.transformer.blocks.{l}.up_proj.weight", "model.layers.{l}.mlp.up_proj.weight"),
    ("model.transformer.blocks.{l}.ff_out.weight", "model.layers.{l}.mlp.down_proj.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),  # the LM head, not a block's ff_out
)
_RENAME = [(re.compile(re.escape(src).replace(r"\{l\}", r"(\d+)") + r"\Z"), dst) for src, dst in LLADA_TO_LLAMA]


def llada_to_llama_key(key: str) -> str:
    """One LLaDA checkpoint key under its HF Llama name; KeyError if it has none."""
    for pattern, dst in _RENAME:
        match = pattern.match(key)
        if match:
            return dst.format(l=match.group(1)) if match.groups() else dst
    raise KeyError(f"No Llama name for LLaDA key {key!r}")


def llama_config(shape: ModelShape, *, attn_implementation: str = "sdpa"):
    """The `LlamaConfig` computing the same function as a LLaDA model of this shape (apart from
    causality, which `BidirectionalReference` removes)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.d_head, hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=shape.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
        attention_dropout=0.0, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return config


class BidirectionalReference:
    """`transformers.LlamaForCausalLM` holding LLaDA weights, called bidirectionally.

    `ref(tokens)` returns logits [batch pos vocab]. Every call passes an all-True boolean 4D mask
    [batch 1 pos pos] (cached per shape and device): transformers returns a 4D mask unchanged, so
    SDPA runs with that mask and `is_causal=False`, i.e. full bidirectional attention (see the
    module docstring). `ref.hf` is the underlying `LlamaForCausalLM`.
    """

    def __init__(self, hf_model):
        self.hf = hf_model
        self._masks: dict[tuple, Tensor] = {}

    def mask(self, tokens: Tensor) -> Tensor:
        batch, n_pos = tokens.shape
        key = (batch, n_pos, tokens.device)
        if key not in self._masks:
            self._masks[key] = torch.ones(batch, 1, n_pos, n_pos, dtype=torch.bool, device=tokens.device)
        return self._masks[key]

    def __call__(self, tokens: Tensor) -> Tensor:
        out = self.hf(input_ids=tokens, attention_mask=self.mask(tokens), use_cache=False)
        return out.logits


def build_reference(
    state_dict: dict[str, Tensor],
    shape: ModelShape,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> BidirectionalReference:
    """`LlamaForCausalLM` holding the LLaDA-keyed `state_dict` (renamed with `LLADA_TO_LLAMA`),
    strictly loaded (every key present, none left over), in eval mode without gradients."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # skip the random init; every parameter is overwritten below
        hf = LlamaForCausalLM(llama_config(shape, attn_implementation=attn_implementation))
    renamed = {llada_to_llama_key(k): v.to(dtype) for k, v in state_dict.items()}
    hf.load_state_dict(renamed, strict=True)
    return BidirectionalReference(hf.to(dtype).eval().requires_grad_(False))


def build_pair(
    shape: ModelShape, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[HookedDiffusionTransformer, BidirectionalReference]:
    """Ours and the reference holding the same random weights (drawn from `seed`)."""
    state_dict = random_llada_state_dict(shape, seed=seed)
    return (build_model(shape, state_dict=state_dict, dtype=dtype),
            build_reference(state_dict, shape, dtype=dtype))


def random_tokens(shape: ModelShape, batch: int, n_pos: int, *, seed: int = 1) -> Tensor:
    """Random ids below the special tokens at the top of the vocabulary, [batch n_pos] int64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab - 2, (batch, n_pos), generator=gen)


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------ timing
def available_threads() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class TimingResult:
    """Per-function timings from `time_interleaved`, one entry per round: wall-clock seconds in
    `times`, process CPU seconds (all threads) in `cpu_times`, and minor page faults of the process
    during the call in `faults` (fresh pages the allocator got from the OS; see bench/README.md)."""

    times: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)

    def median(self, name: str, cpu: bool = False) -> float:
        return median((self.cpu_times if cpu else self.times)[name])

    def ratio(self, num: str, den: str, cpu: bool = False) -> float:
        """Median over rounds of the per-round ratio num/den. The two runs of a round are adjacent
        in time, so slow drifts of background load cancel, and the median discards spikes."""
        times = self.cpu_times if cpu else self.times
        return median(a / b for a, b in zip(times[num], times[den]))

    def ratio_of_medians(self, num: str, den: str, cpu: bool = False) -> float:
        return self.median(num, cpu) / self.median(den, cpu)

    def faults_per_call(self, name: str) -> float:
        """Median minor page faults of one call."""
        return median(self.faults[name])


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 3,
    min_seconds: float = 0.0,
) -> TimingResult:
    """Time each function `repeats` times (more until `min_seconds` have passed), interleaved: each
    round runs every function once, in an order rotated from round to round, so no function
    always follows another. `warmup` untimed rounds come first. A function's return value is
    dropped inside its timed interval (freeing it is part of its cost)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    result = TimingResult(*({name: [] for name in names} for _ in range(3)))
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            result.times[name].append(time.perf_counter() - t0)
            result.cpu_times[name].append(time.process_time() - c0)
            result.faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        rounds += 1
    return result
