"""Train the embedded "tiny-refusal" model with the LLaDA SFT objective, in two stages.

    python -m diffusion_lens.studies.tiny_refusal.train --out diffusion_lens/pretrained/tiny-refusal

Why two stages: a model trained on refusals from scratch learns refusal from many word-level
cues, per language. Aligned chat models instead learn refusal late and thinly on top of a
capable base. So stage 1 trains a base that answers every request (harmful ones with bland
placeholder plans) in both languages, and stage 2 is a short fine-tune on the same prompts in
which harmful requests are refused.

Objective (LLaDA SFT): the prompt is never masked; each response token (its EOS padding
included) is masked with probability t ~ U(eps, 1) drawn per row; cross-entropy on the masked
positions is weighted by 1/t and normalised by the response length.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lens import DiffusionConfig, HookedDiffusionTransformer
from diffusion_lens.checkpoints import get_adapter
from diffusion_lens.studies.tiny_refusal.data import corpus, generate_dataset
from diffusion_lens.studies.tiny_refusal.tokenizer import encode_example, save_tokenizer, special_token_ids, train_tokenizer


@dataclass
class TrainConfig:
    seed: int = 0
    n_train: int = 80000
    frame_noise: float = 0.2  # share of train frames with an inserted nonce word (data.FRAME_NOISE_SHARE)
    cross_lingual: float = 0.25  # share of train action requests answered in the other language (data.CROSS_LINGUAL_SHARE)
    code_mix: float = 0.0  # share of train action requests with the verb phrase in the other language (data.CODE_MIX_SHARE)
    vocab_size: int = 2048
    gen_length: int = 32
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 384
    batch_size: int = 64
    stage1_steps: int = 1200
    stage2_steps: int = 400
    lr: float = 2e-3
    stage2_lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    mask_eps: float = 1e-3
    compile: bool = False  # eager by default: bucketed batches have varying widths
    # LLaDA-MoE format instead of LLaDA when n_experts > 0: every layer's MLP is a mixture of
    # n_experts SwiGLU experts of width d_expert_mlp, top n_experts_per_token, softmax router.
    n_experts: int = 0
    n_experts_per_token: int = 2
    d_expert_mlp: int = 192
    router_aux_loss: float = 0.01  # Switch-style load balancing, so that every expert is used
    threads: int = 0  # torch threads (0: torch's default)


@dataclass
class Encoded:
    """A split as one left-padded tensor: every prompt ends at the same column, then the canvas."""

    tokens: Int[Tensor, "n pos"]
    attention_mask: Int[Tensor, "n pos"]
    prompt_width: int


def encode_split(tokenizer, examples, gen_length: int, pad_id: int) -> Encoded:
    rows = []
    for example in examples:
        try:
            rows.append(encode_example(tokenizer, example, gen_length))
        except ValueError:  # response longer than the canvas: skip rather than truncate
            continue
    width = max(prompt_len for _, prompt_len in rows)
    tokens = torch.full((len(rows), width + gen_length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (ids, prompt_len) in enumerate(rows):
        start = width - prompt_len
        tokens[i, start:] = torch.tensor(ids)
        mask[i, start:] = 1
    return Encoded(tokens, mask, width)


def length_bucketed_batches(data: Encoded, batch_size: int, generator: torch.Generator, window: int = 32):
    """One epoch of random batches whose prompts have similar lengths, so little compute goes to padding:
    shuffle, sort each window of `window` batches by prompt length, cut, shuffle the batches."""
    prompt_lengths = data.attention_mask[:, : data.prompt_width].sum(1)
    order = torch.randperm(len(data.tokens), generator=generator)
    batches = []
    for start in range(0, len(order), batch_size * window):
        chunk = order[start: start + batch_size * window]
        chunk = chunk[prompt_lengths[chunk].argsort()]
        batches += [b for b in chunk.split(batch_size) if len(b) == batch_size]
    for i in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[i]


def trim_padding(data: Encoded, idx: Tensor) -> tuple[Tensor, Tensor, int]:
    """The batch without the left columns that are padding in every row."""
    mask = data.attention_mask[idx]
    drop = int((mask[:, : data.prompt_width].sum(0) == 0).sum())
    return data.tokens[idx, drop:], mask[:, drop:], data.prompt_width - drop


def mask_responses(
    tokens: Int[Tensor, "batch pos"], prompt_width: int, mask_id: int, eps: float, generator: torch.Generator
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"], Float[Tensor, "batch 1"]]:
    """Mask each response token with probability p = (1 - eps) t + eps, t ~ U(0, 1) per row."""
    batch, n_pos = tokens.shape
    p = (1 - eps) * torch.rand(batch, 1, generator=generator) + eps
    masked = torch.rand(batch, n_pos, generator=generator) < p
    masked[:, :prompt_width] = False
    return torch.where(masked, mask_id, tokens), masked, p


def sft_loss(
    model: HookedDiffusionTransformer, batch: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
    prompt_width: int, eps: float, generator: torch.Generator, router_aux_loss: float = 0.0,
) -> Float[Tensor, ""]:
    noisy, masked, p = mask_responses(batch, prompt_width, model.cfg.mask_token_id, eps, generator)
    routing: list[tuple[Tensor, Tensor]] = []
    hooks = _routing_hooks(model, routing, attention_mask.bool()) if router_aux_loss and model.cfg.is_moe else []
    with model.hooks(fwd_hooks=hooks):
        logits = model.token_logits(model(noisy, attention_mask))
    ce = F.cross_entropy(logits[masked].float(), batch[masked], reduction="none")
    weights = (1.0 / p).expand_as(masked)[masked]
    response_length = batch.shape[1] - prompt_width
    loss = (ce * weights).sum() / (batch.shape[0] * response_length)
    return loss + router_aux_loss * load_balancing_loss(routing, model.cfg.n_experts) if routing else loss


def _routing_hooks(model, routing: list, keep: Bool[Tensor, "batch pos"]) -> list:
    """Hooks that append (router probs, chosen-expert mask) of the real tokens of every MoE layer."""
    probs: dict[int, Tensor] = {}

    def save_probs(value, hook):
        probs[hook.layer()] = value[keep]

    def save_choice(value, hook):
        routing.append((probs.pop(hook.layer()), (value[keep] > 0).float()))

    names = [f"blocks.{layer}.mlp.hook_router_probs" for layer in model.cfg.moe_layers]
    return [(n, save_probs) for n in names] + [(n.replace("router_probs", "expert_weights"), save_choice) for n in names]


def load_balancing_loss(routing: list[tuple[Tensor, Tensor]], n_experts: int) -> Float[Tensor, ""]:
    """Switch Transformer's auxiliary loss, mean over layers: n_experts * sum_e (share of tokens
    routed to e) * (mean router probability of e); 1.0 when routing is uniform."""
    return torch.stack([n_experts * (chosen.mean(0) / chosen.mean(0).sum() * prob.mean(0)).sum()
                        for prob, chosen in routing]).mean()


def build_model(tokenizer, tc: TrainConfig) -> HookedDiffusionTransformer:
    """A freshly initialised model in LLaDA's format, or LLaDA-MoE's when `tc.n_experts` > 0."""
    ids = special_token_ids(tokenizer)
    family = "llada_moe" if tc.n_experts else "llada"
    adapter = get_adapter(family)
    cfg = adapter.to_config(_moe_checkpoint_config(tokenizer, tc)) if tc.n_experts else DiffusionConfig(
        d_model=tc.d_model, n_layers=tc.n_layers, n_heads=tc.n_heads, d_mlp=tc.d_mlp, d_vocab=len(tokenizer),
        rope_theta=10000.0, norm_eps=1e-5, mask_token_id=ids["mask"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], family="llada",
    )
    cfg = replace(cfg, eot_token_id=ids["eot"], model_name="tiny-refusal-moe" if tc.n_experts else "tiny-refusal")
    torch.manual_seed(tc.seed)
    model = HookedDiffusionTransformer(cfg, tokenizer=tokenizer)
    residual_writers = ("o_proj", "down_proj")
    for name, param in model.named_parameters():
        if param.ndim == 1:
            torch.nn.init.ones_(param)
        else:
            writes = any(part in residual_writers for part in name.split(".")[-2:])
            torch.nn.init.normal_(param, std=0.02 / math.sqrt(2 * tc.n_layers) if writes else 0.02)
    model.adapter = adapter
    return model


def _moe_checkpoint_config(tokenizer, tc: TrainConfig) -> dict:
    """The config.json of a LLaDA-MoE checkpoint with these sizes (read by the llada_moe adapter,
    so the model is exactly what loading such a checkpoint builds)."""
    ids = special_token_ids(tokenizer)
    return {
        "model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "vocab_size": len(tokenizer),
        "hidden_size": tc.d_model, "num_hidden_layers": tc.n_layers, "num_attention_heads": tc.n_heads,
        "num_key_value_heads": tc.n_heads, "num_experts": tc.n_experts, "num_experts_per_tok": tc.n_experts_per_token,
        "expert_intermediate_size": tc.d_expert_mlp, "dense_intermediate_size": tc.d_mlp,
        "shared_expert_intermediate_size": None, "moe_layer_freq": [1] * tc.n_layers,
        "moe_router_score_function": "softmax", "norm_topk_prob": False, "moe_router_enable_expert_bias": False,
        "qk_layernorm": True, "attention_bias": False, "clip_qkv": None, "partial_rotary_factor": 1.0,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 1024,
        "mask_token_id": ids["mask"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "bos_token_id": ids["bos"],
    }


def train_stage(
    model, step_fn, data: Encoded, steps: int, lr: float, tc: TrainConfig, stage: str, log: list, generator
) -> None:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    warmup = min(tc.warmup_steps, steps // 5)
    schedule = lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches, smoothed = iter(()), None
    bar = tqdm(range(steps), desc=stage, dynamic_ncols=True)
    for step in bar:
        idx = next(batches, None)
        if idx is None:
            batches = length_bucketed_batches(data, tc.batch_size, generator)
            idx = next(batches)
        tokens, mask, width = trim_padding(data, idx)
        loss = step_fn(tokens, mask, width, tc.mask_eps, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        log.append({"stage": stage, "step": step, "loss": value, "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{smoothed:.3f}")


def train(out: Path, tc: TrainConfig, base_dir: Path | None = None) -> HookedDiffusionTransformer:
    """Both stages; with `base_dir`, stage 1 is loaded from there if it exists, else saved there
    (so the refusal fine-tune can be iterated on without retraining the base)."""
    started = time.time()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    generator = torch.Generator().manual_seed(tc.seed)
    sizes = dict(n_train=tc.n_train, n_val=0, n_test=0, seed=tc.seed, frame_noise=tc.frame_noise,
                 code_mix=tc.code_mix, cross_lingual=tc.cross_lingual)
    base = generate_dataset(**sizes, stage="base")["train"]
    aligned = generate_dataset(**sizes, stage="aligned")["train"]
    log: list[dict] = []
    if base_dir is not None and (base_dir / "config.json").is_file():
        model = HookedDiffusionTransformer.from_pretrained(base_dir)
        tokenizer = model.tokenizer
        print(f"stage 1 loaded from {base_dir}")
    else:
        tokenizer = train_tokenizer(corpus(base + aligned), vocab_size=tc.vocab_size)
        model = build_model(tokenizer, tc)
    pad_id = special_token_ids(tokenizer)["pad"]
    model.train().requires_grad_(True)
    print(f"{model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    def step_fn(tokens, mask, width, eps, gen):
        return sft_loss(model, tokens, mask, width, eps, gen, tc.router_aux_loss)

    compiled = torch.compile(step_fn) if tc.compile else step_fn
    if base_dir is None or not (base_dir / "config.json").is_file():
        stage1 = encode_split(tokenizer, base, tc.gen_length, pad_id)
        train_stage(model, compiled, stage1, tc.stage1_steps, tc.lr, tc, "stage1-base", log, generator)
        if base_dir is not None:
            model.save_pretrained(base_dir)
            save_tokenizer(tokenizer, base_dir)
    stage2 = encode_split(tokenizer, aligned, tc.gen_length, pad_id)
    train_stage(model, compiled, stage2, tc.stage2_steps, tc.stage2_lr, tc, "stage2-refusal", log, generator)
    model.eval().requires_grad_(False)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    with open(out / "loss_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stage", "step", "loss", "lr"])
        writer.writeheader()
        writer.writerows(log)
    summary = {
        "train_config": asdict(tc),
        "minutes": round((time.time() - started) / 60, 1),
        "final_loss": {stage: _tail_mean([r["loss"] for r in log if r["stage"] == stage]) for stage in ("stage1-base", "stage2-refusal")},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return model


def _tail_mean(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return round(sum(tail) / max(1, len(tail)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint to")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="where the stage-1 base is saved, or loaded from if it is already there")
    for name, default in asdict(TrainConfig()).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = vars(parser.parse_args())
    out, base_dir = args.pop("out"), args.pop("base_dir")
    train(out, TrainConfig(**args), base_dir)


if __name__ == "__main__":
    main()
