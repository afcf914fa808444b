"""Reader of the DiffusionGemma goldens (tests/fixtures/README-diffusion-gemma.md).

`read_config` resolves `config.json` (both serialized forms) into per-layer facts; `read_forward`
returns the five recorded forward passes of `golden_forward.safetensors` (`enc`, `dec`, `dec_sc`,
`enc2`, `dec2`) as `ForwardPass` objects with the inputs each pass read; `read_runs` returns the 12
`generate()` runs of `golden_generate.safetensors` as `GoldenRun` objects with their step traces.
The readers are strict: a key they do not consume, or one they expect and do not find, is an error,
so a renamed or dropped tensor fails here and not deep inside a parity test. Metadata JSON is
returned exactly as stored (`kwargs` keeps `"decoder_input_ids": "<tensor ...>"` and
`"sampler_config": {"entropy_bound": x}`; `GoldenRun.generate_kwargs` builds the call).

Example:
    >>> fwd = read_forward(FIXTURES / "diffusion-gemma-tiny")
    >>> fwd.passes["dec_sc"].logits.shape, fwd.passes["enc"].cache[1][0].shape
    >>> run = read_runs(FIXTURES / "diffusion-gemma-tiny")["batch_eos"]
    >>> run.canvas_read(0).equal(run.trace.decoder_input[0]), run.committed_argmax(1).shape
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import Tensor

SOFTCAP_DEFAULT = 30.0  # `final_logit_softcapping` is a class attribute: absent from save_pretrained's config.json
GLOBAL_HEAD_DIM_DEFAULT = 512  # `global_head_dim` when neither it nor `per_layer_config` is given
PASSES = ("enc", "dec", "dec_sc", "enc2", "dec2")
ENCODER_PASSES = ("enc", "enc2")
RUNS = (  # README order
    "single_lowtemp", "single_default", "batch_default", "batch_lowtemp", "batch_eos", "batch_early_stop",
    "single_stability0", "single_one_step", "single_stable_only", "single_init_canvas", "single_genconfig",
    "single_max_length",
)
TRACE_FIELDS = (
    "block", "cur_step", "temperature", "decoder_input", "has_self_conditioning", "sampled", "entropy",
    "accepted_mask", "renoised", "argmax", "stop_signal", "mean_entropy", "finished",
)
# fine-grained hook points per layer (README "Fine-grained intermediates"); `v_proj` only on sliding layers
ENC_HOOKS = ("ln1", "q_normed", "k_normed", "v_normed", "attn_out", "resid_mid", "ffn_out")
DEC_HOOKS = ENC_HOOKS + (
    "k_proj", "attn_z", "attn_out_normed", "ln2", "mlp_out", "mlp_out_normed", "moe_in", "moe_out", "moe_out_normed",
    "attn_pattern",
)


@dataclass(frozen=True)
class GemmaConfig:
    """The text facts of `config.json`, per layer, whichever serialized form it uses.

    `head_dim[i]` / `kv_heads[i]` come from `per_layer_config` (save_pretrained form, keys are layer
    indices, possibly zero-padded, or a layer type) or, without it, from `global_head_dim` (default
    512) / `num_global_key_value_heads` on full-attention layers (published hub form)."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    layer_types: tuple[str, ...]  # "sliding_attention" / "full_attention"
    head_dim: tuple[int, ...]
    kv_heads: tuple[int, ...]
    sliding_window: int  # W; a sliding layer's cache keeps W - 1 positions
    canvas_length: int  # C
    d_mlp: int  # dense MLP and self-conditioning width
    n_experts: int
    top_k: int
    d_expert: int
    softcap: float
    eps: float
    pad_id: int
    bos_id: int
    eos_id: int

    def sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def cache_len(self, layer: int, written: int) -> int:
        """Positions layer `layer` keeps after `written` positions were encoded."""
        return min(written, self.sliding_window - 1) if self.sliding(layer) else written


def read_config(source: Path | dict) -> GemmaConfig:
    """`folder/config.json` (or its parsed dict) resolved per layer."""
    raw = source if isinstance(source, dict) else json.loads((source / "config.json").read_text())
    if raw.get("model_type") != "diffusion_gemma":
        raise ValueError(f"model_type {raw.get('model_type')!r}, expected 'diffusion_gemma'")
    text = raw["text_config"]
    types = tuple(text["layer_types"])
    head_dim, kv_heads = [text["head_dim"]] * len(types), [text["num_key_value_heads"]] * len(types)
    if "per_layer_config" in text:
        for key, override in text["per_layer_config"].items():
            layers = [i for i, kind in enumerate(types) if kind == key] if key in set(types) else [int(key)]
            for i in layers:
                head_dim[i] = override.get("head_dim", head_dim[i])
                kv_heads[i] = override.get("num_key_value_heads", kv_heads[i])
    else:
        for i, kind in enumerate(types):
            if kind == "full_attention":
                head_dim[i] = text.get("global_head_dim", GLOBAL_HEAD_DIM_DEFAULT)
                kv_heads[i] = text.get("num_global_key_value_heads") or kv_heads[i]
    return GemmaConfig(
        vocab=text["vocab_size"], d_model=text["hidden_size"], n_layers=text["num_hidden_layers"],
        n_heads=text["num_attention_heads"], layer_types=types, head_dim=tuple(head_dim), kv_heads=tuple(kv_heads),
        sliding_window=text["sliding_window"], canvas_length=raw["canvas_length"], d_mlp=text["intermediate_size"],
        n_experts=text["num_experts"], top_k=text["top_k_experts"], d_expert=text["moe_intermediate_size"],
        softcap=text.get("final_logit_softcapping", SOFTCAP_DEFAULT), eps=text["rms_norm_eps"],
        pad_id=text["pad_token_id"], bos_id=text["bos_token_id"], eos_id=text["eos_token_id"],
    )


class _Strict:
    """A safetensors file whose every key must be read exactly once (see `close`)."""

    def __init__(self, path: Path):
        with safe_open(str(path), "pt") as file:
            self.metadata = file.metadata()
            self.tensors = {key: file.get_tensor(key) for key in file.keys()}
        self.path, self.unread = path, set(self.tensors)

    def __call__(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise KeyError(f"{self.path.name}: no tensor {key!r}")
        self.unread.discard(key)
        return self.tensors[key]

    def maybe(self, key: str) -> Optional[Tensor]:
        return self(key) if key in self.tensors else None

    def close(self) -> None:
        if self.unread:
            raise KeyError(f"{self.path.name}: tensors no reader field takes: {sorted(self.unread)[:8]}")


@dataclass(frozen=True)
class RouterRecord:
    """One layer's routing over the pass's 2·T rows (batch-major flattening of [2, T])."""

    logits: Tensor  # [2T E] scores proj(rms(resid_mid)·scale·D^-1/2), before softmax
    probs: Tensor  # [2T E] softmax of the scores (HF's `router_logits`)
    topk_weights: Tensor  # [2T K] top-K probs renormalised to sum 1, then × per_expert_scale[idx]
    topk_index: Tensor  # [2T K] int64, torch.topk order


@dataclass(frozen=True)
class LayerRecord:
    out: Tensor  # [2 T D] residual after the layer, × this pass's layer_scalar (before the final norm)
    router: RouterRecord
    hooks: dict[str, Tensor]  # fine-grained points (enc / dec only, README table), by suffix


@dataclass(frozen=True)
class ForwardPass:
    """One recorded forward pass and what it read.

    `input_ids` are the T tokens the pass embeds (enc: the prompt; dec, dec_sc: `fwd.canvas`; enc2:
    `fwd.block1_tokens`; dec2: `fwd.canvas2`), at `position_ids` after `past_len` cached positions;
    `attention_mask` covers cache + these tokens (1 = real). `cache` (encoder passes) is the cache
    after the pass: per layer (keys post-k_norm post-RoPE, values post-v_norm), [2 kv_i L_i hd_i]."""

    name: str
    input_ids: Tensor  # [2 T]
    attention_mask: Tensor  # [2 past_len+T]
    position_ids: Tensor  # [T]
    past_len: int
    self_conditioning_logits: Optional[Tensor]  # [2 C V], dec_sc only (= fwd.sc_logits)
    embed: Optional[Tensor]  # [2 T D] E[ids]·√D (enc.embed / dec*.token_embed); absent for dec2
    soft_embeddings: Optional[Tensor]  # [2 C D] softmax(sc_logits)·E·√D, dec_sc only
    sc_signal: Optional[Tensor]  # [2 C D] self-conditioning MLP output, dec_sc only
    inputs_embeds: Optional[Tensor]  # [2 C D] rms(token_embed + sc_signal), decoder passes
    layers: tuple[LayerRecord, ...]
    last_hidden_state: Tensor  # [2 T D] after the final norm
    logits: Optional[Tensor]  # [2 C V] softcapped, decoder passes
    logits_presoftcap: Optional[Tensor]  # [2 C V], dec only
    cache: Optional[tuple[tuple[Tensor, Tensor], ...]]

    @property
    def is_encoder(self) -> bool:
        return self.name in ENCODER_PASSES

    @property
    def query_mask(self) -> Tensor:
        """[2 T] bool: the pass's real (non-pad) query positions; compare only these unless pads are safe-softmaxed."""
        return self.attention_mask[:, self.past_len:].bool()


@dataclass(frozen=True)
class GoldenForward:
    input_ids: Tensor  # [2 P] row 1 left-padded
    attention_mask: Tensor  # [2 P]
    canvas: Tensor  # [2 C]
    sc_logits: Tensor  # [2 C V] dec.logits / sc_logits_divisor
    block1_tokens: Tensor  # [2 C] argmax(dec.logits)
    canvas2: Tensor  # [2 C]
    passes: dict[str, ForwardPass]
    metadata: dict[str, str]  # as stored

    @property
    def prompt_len(self) -> int:
        return int(self.metadata["fwd_prompt_len"])


def read_forward(folder: Path) -> GoldenForward:
    """The five passes of `folder/golden_forward.safetensors`, in the recorded order."""
    cfg, get = read_config(folder), _Strict(folder / "golden_forward.safetensors")
    fwd = {name: get(f"fwd.{name}") for name in
           ("input_ids", "attention_mask", "canvas", "sc_logits", "block1_tokens", "canvas2")}
    prompt, width = fwd["input_ids"].shape[1], cfg.canvas_length
    reads = {  # name: (input_ids, attention_mask, position_ids, past_len)
        "enc": (fwd["input_ids"], fwd["attention_mask"], torch.arange(prompt), 0),
        "dec": (fwd["canvas"], get("dec.decoder_attention_mask"), torch.arange(prompt, prompt + width), prompt),
        "enc2": (fwd["block1_tokens"], get("enc2.attention_mask"), get("enc2.position_ids")[0], prompt),
        "dec2": (fwd["canvas2"], get("dec2.decoder_attention_mask"), torch.arange(prompt + width, prompt + 2 * width),
                 prompt + width),
    }
    reads["dec_sc"] = reads["dec"]
    passes = {}
    for p in PASSES:
        hooks = ENC_HOOKS if p == "enc" else DEC_HOOKS if p == "dec" else ()
        layers = tuple(
            LayerRecord(
                out=get(f"{p}.layers.{i}.out"),
                router=RouterRecord(*(get(f"{p}.layers.{i}.router.{f}") for f in
                                      ("logits", "probs", "topk_weights", "topk_index"))),
                hooks={h: get(f"{p}.layers.{i}.{h}")
                       for h in hooks + (("v_proj",) if p == "dec" and cfg.sliding(i) else ())},
            )
            for i in range(cfg.n_layers)
        )
        cache = tuple((get(f"{p}.cache.{i}.keys"), get(f"{p}.cache.{i}.values")) for i in range(cfg.n_layers)) \
            if p in ENCODER_PASSES else None
        ids, mask, positions, past = reads[p]
        passes[p] = ForwardPass(
            name=p, input_ids=ids, attention_mask=mask, position_ids=positions, past_len=past,
            self_conditioning_logits=fwd["sc_logits"] if p == "dec_sc" else None,
            embed=get.maybe(f"{p}.embed") if p in ENCODER_PASSES else get.maybe(f"{p}.token_embed"),
            soft_embeddings=get.maybe(f"{p}.soft_embeddings"), sc_signal=get.maybe(f"{p}.sc_signal"),
            inputs_embeds=get.maybe(f"{p}.inputs_embeds"), layers=layers,
            last_hidden_state=get(f"{p}.last_hidden_state"),
            logits=get.maybe(f"{p}.logits"), logits_presoftcap=get.maybe(f"{p}.logits_presoftcap"), cache=cache,
        )
    get.close()
    return GoldenForward(**fwd, passes=passes, metadata=get.metadata)


@dataclass(frozen=True)
class StepTrace:
    """Per denoising step s (all blocks concatenated), as `generate()` saw it (README "Per run")."""

    block: Tensor  # [S] block index
    cur_step: Tensor  # [S] N, N-1, ..., 1 within a block
    temperature: Tensor  # [S] f32 t_min + (t_max - t_min)·(cur_step / N)
    decoder_input: Tensor  # [S B C] canvas the decoder read
    has_self_conditioning: Tensor  # [S] bool, False exactly at a block's first step
    sampled: Tensor  # [S B C] multinomial draws from softmax(logits / T)
    entropy: Tensor  # [S B C] entropy of logits / T (before the frozen-row override)
    accepted_mask: Tensor  # [S B C] entropy-bound acceptance
    renoised: Tensor  # [S B C] accepted samples, fresh noise elsewhere (before the frozen-row override)
    argmax: Tensor  # [S B C] draft after the frozen-row override; a block's last one is committed
    stop_signal: Tensor  # [S B] stopping criterion output
    mean_entropy: Tensor  # [S B] its confidence statistic (after the frozen-row override)
    finished: Tensor  # [S B] OR of the block's stop signals so far


@dataclass(frozen=True)
class GoldenRun:
    """One `generate()` run, replayed as
    `torch.manual_seed(seed); generate(prompt_ids, [attention_mask,] **generate_kwargs())`."""

    name: str
    seed: int
    kwargs: dict  # JSON as stored
    effective_config: dict  # JSON as stored (`sampler_config` = the entropy bound)
    n_blocks: int
    n_steps: int
    prompt_ids: Tensor  # [B P]
    attention_mask: Optional[Tensor]  # [B P], batch runs only
    init_canvas: Optional[Tensor]  # [1 C], single_init_canvas only
    sequences: Tensor  # [B P+k·C]
    tokens_per_forward: Tensor  # [B] f32
    blocks: Tensor  # [k B C] committed canvases after EOS/pad finalization
    encoder_input_block1plus: Tensor  # [k-1 B C]
    trace: StepTrace

    def generate_kwargs(self) -> dict:
        """The recorded kwargs with the canvas tensor in place of its `"<tensor ...>"` placeholder."""
        kwargs = dict(self.kwargs)
        if "decoder_input_ids" in kwargs:
            kwargs["decoder_input_ids"] = self.init_canvas
        return kwargs

    def steps_of_block(self, block: int) -> range:
        """Trace indices of the steps of `block`."""
        where = (self.trace.block == block).nonzero().flatten()
        if len(where) == 0:
            raise IndexError(f"{self.name}: no block {block} (ran {self.n_blocks})")
        return range(int(where[0]), int(where[-1]) + 1)

    def canvas_read(self, step: int) -> Tensor:
        """[B C] the canvas the decoder read at `step` (= trace.decoder_input[step])."""
        return self.trace.decoder_input[step]

    def finished_before(self, step: int) -> Tensor:
        """[B] rows frozen at `step`: finished at an earlier step of the same block."""
        if step == 0 or self.trace.block[step - 1] != self.trace.block[step]:
            return torch.zeros_like(self.trace.finished[step])
        return self.trace.finished[step - 1]

    def committed_argmax(self, block: int) -> Tensor:
        """[B C] the argmax draft of `block`'s last step: the block's output before EOS/pad finalization."""
        return self.trace.argmax[self.steps_of_block(block)[-1]]


@dataclass(frozen=True)
class GoldenGenerate:
    runs: dict[str, GoldenRun]
    generation_config: dict  # generation_config_json, as stored
    metadata: dict[str, str]  # as stored

    @property
    def prompt_len(self) -> int:
        return int(self.metadata["gen_prompt_len"])

    @property
    def pads_row1(self) -> int:
        return int(self.metadata["gen_pads_row1"])


def read_runs(folder: Path) -> GoldenGenerate:
    """Every run of `folder/golden_generate.safetensors`, in README order."""
    get = _Strict(folder / "golden_generate.safetensors")
    meta = get.metadata
    recorded = {key.split(".")[1] for key in meta if key.startswith("gen.")}
    if recorded != set(RUNS):
        raise KeyError(f"runs {sorted(recorded)}, expected {sorted(RUNS)}")
    runs = {}
    for name in RUNS:
        g = f"gen.{name}"
        runs[name] = GoldenRun(
            name=name, seed=int(meta[f"{g}.seed"]), kwargs=json.loads(meta[f"{g}.kwargs"]),
            effective_config=json.loads(meta[f"{g}.effective_generation_config"]),
            n_blocks=int(meta[f"{g}.n_blocks"]), n_steps=int(meta[f"{g}.n_steps"]),
            prompt_ids=get(f"{g}.prompt_ids"), attention_mask=get.maybe(f"{g}.attention_mask"),
            init_canvas=get.maybe(f"{g}.init_canvas"), sequences=get(f"{g}.sequences"),
            tokens_per_forward=get(f"{g}.tokens_per_forward"), blocks=get(f"{g}.blocks"),
            encoder_input_block1plus=get(f"{g}.encoder_input_block1plus"),
            trace=StepTrace(**{f: get(f"{g}.trace.{f}") for f in TRACE_FIELDS}),
        )
    get.close()
    return GoldenGenerate(runs=runs, generation_config=json.loads(meta["generation_config_json"]), metadata=meta)


def entropy_bound_accept(entropy: Tensor, bound: float) -> Tensor:
    """[.. C] bool: the spec's acceptance (§6.4): sort ascending, keep while the exclusive cumsum <= bound."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep = (sorted_h.cumsum(-1) - sorted_h) <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def planned_blocks(run: GoldenRun, canvas_length: int, prompt_len: int) -> int:
    """ceil(max_new_tokens / C), where `max_length` replaces max_new_tokens only when that is the global 256 (§6.2)."""
    cfg = run.effective_config
    new = cfg["max_new_tokens"]
    if cfg["max_length"] is not None and new == 256:
        new = cfg["max_length"] - prompt_len
    return math.ceil(new / canvas_length)


def randomize_weights(reference: torch.nn.Module, generator: torch.Generator, self_conditioning_divisor: float = 1.0) -> None:
    """Fill a transformers `DiffusionGemmaForBlockDiffusion` with random weights, in place, like the fixtures:
    1-D tensors 1 + 0.2 N (q/k norms halved), embeddings N, matrices N / sqrt(fan_in); the self-conditioning
    `down_proj` further divided by `self_conditioning_divisor` (the fixtures use 10: a contractive loop)."""
    with torch.no_grad():
        for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
            if name.endswith("inv_freq") or "embed_scale" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim == 1:
                scale = 0.5 if ("q_norm" in name or "k_norm" in name) else 1.0
                tensor.copy_(scale * (1 + 0.2 * noise))
            else:
                divisor = self_conditioning_divisor if "self_conditioning.down_proj" in name else 1
                tensor.copy_(noise / (1 if "embed" in name else math.sqrt(tensor.shape[-1])) / divisor)
