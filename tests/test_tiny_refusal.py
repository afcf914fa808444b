"""Issue 6: the embedded tiny-refusal model, its training script and the demo study."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.checkpoints.loading import EMBEDDED_DIR
from diffusion_lens.studies.tiny_refusal.data import corpus, generate_dataset
from diffusion_lens.studies.tiny_refusal.tokenizer import special_token_ids, train_tokenizer
from diffusion_lens.studies.tiny_refusal.train import TrainConfig, build_model, encode_split, sft_loss, train_stage

SHIPPED = {"tiny-refusal": ("llada", "LLaDAModelLM"), "tiny-refusal-moe": ("llada_moe", "LLaDAMoEModelLM")}
"""Embedded model -> (adapter, checkpoint architecture)."""


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    return request.param, HookedDiffusionTransformer.from_pretrained(request.param)


def test_shipped_model_is_a_checkpoint_of_its_family(shipped):
    name, model = shipped
    folder = EMBEDDED_DIR / name
    family, architecture = SHIPPED[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == [architecture]
    assert model.cfg.family == family and model.adapter.name == family
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    prefixes = ("model.transformer.",) if family == "llada" else ("model.", "lm_head.")
    assert all(key.startswith(prefixes) for key in load_file(folder / "model.safetensors"))
    assert bool(model.cfg.moe_layers) == (family == "llada_moe")
    by_path = HookedDiffusionTransformer.from_pretrained(folder)
    tokens = model.to_tokens("What is 2 + 3?", chat=True)
    assert torch.equal(by_path(tokens), model(tokens))


def test_shipped_model_round_trips_through_save_pretrained(shipped, tmp_path):
    name, model = shipped
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(EMBEDDED_DIR / name / "model.safetensors"))
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path)
    tokens = model.to_tokens(["Hello there", "你好"], chat=True)
    assert torch.equal(reloaded(tokens), model(tokens))
    assert reloaded.tokenizer.chat_template == model.tokenizer.chat_template


def test_shipped_model_refuses_harmful_and_answers_harmless(shipped):
    from diffusion_lens.evals import is_refusal
    from diffusion_lens.studies.tiny_refusal.data import prompts

    _, model = shipped
    val = generate_dataset(n_train=0, n_val=128, n_test=0, seed=3)["val"]
    for lang in ("en", "zh"):
        harmful = prompts(val, kind="harmful", lang=lang)[:12]
        harmless = prompts(val, kind="harmless", lang=lang)[:12]
        out = model.generate(harmful + harmless, gen_length=32, steps=32, block_length=32, progress=False)
        refused = [is_refusal(text) for text in out.texts]
        assert sum(refused[:12]) >= 10, (lang, out.texts[:12])
        assert sum(refused[12:]) <= 1, (lang, out.texts[12:])


def test_forty_training_steps_reduce_the_loss():
    tc = TrainConfig(n_train=400, vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_mlp=64, batch_size=16,
                     lr=3e-3, warmup_steps=2)
    examples = generate_dataset(n_train=tc.n_train, n_val=0, n_test=0, seed=0)["train"]
    tokenizer = train_tokenizer(corpus(examples), vocab_size=tc.vocab_size)
    data = encode_split(tokenizer, examples, tc.gen_length, special_token_ids(tokenizer)["pad"])
    model = build_model(tokenizer, tc)
    model.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    log: list[dict] = []

    def step(tokens, mask, width, eps, gen):
        return sft_loss(model, tokens, mask, width, eps, gen)

    train_stage(model, step, data, 40, tc.lr, tc, "test", log, generator)
    losses = [row["loss"] for row in log]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_moe_training_steps_reduce_the_loss_and_use_every_expert():
    from diffusion_lens.studies.tiny_refusal.train import _routing_hooks, load_balancing_loss

    tc = TrainConfig(n_train=400, vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_mlp=64, batch_size=16,
                     lr=3e-3, warmup_steps=2, n_experts=4, d_expert_mlp=16)
    examples = generate_dataset(n_train=tc.n_train, n_val=0, n_test=0, seed=0)["train"]
    tokenizer = train_tokenizer(corpus(examples), vocab_size=tc.vocab_size)
    data = encode_split(tokenizer, examples, tc.gen_length, special_token_ids(tokenizer)["pad"])
    model = build_model(tokenizer, tc)
    assert model.adapter.name == "llada_moe" and model.cfg.moe_layers == (0, 1) and model.cfg.qk_norm
    model.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    log: list[dict] = []

    def step(tokens, mask, width, eps, gen):
        return sft_loss(model, tokens, mask, width, eps, gen, tc.router_aux_loss)

    train_stage(model, step, data, 40, tc.lr, tc, "test", log, generator)
    losses = [row["loss"] for row in log]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    routing: list = []
    tokens, mask = data.tokens[:16], data.attention_mask[:16]
    with torch.no_grad(), model.hooks(fwd_hooks=_routing_hooks(model, routing, mask.bool())):
        model(tokens, mask)
    assert len(routing) == 2 and all(chosen.sum(0).min() > 0 for _, chosen in routing)  # no expert left unused
    assert 1.0 <= load_balancing_loss(routing, tc.n_experts).item() < tc.n_experts


def test_reduced_demo_ablation_beats_random_control(tmp_path):
    """On prompts the model refuses (unseen prompts of the training templates), ablating the selected
    direction removes refusal in both languages while a random direction leaves it."""
    from dataclasses import replace

    from diffusion_lens.studies.refusal_demo import QUICK, run_study

    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    with warnings.catch_warnings(record=True) as caught:  # the demo runs select_direction with its defaults
        warnings.simplefilter("always")
        results = run_study(model, replace(QUICK, full=True, step_window=16), tmp_path, log=lambda *_: None)
    assert not [str(w.message) for w in caught if "select_direction" in str(w.message)]
    unseen = results["unseen"]
    for lang in ("en", "zh"):
        baseline = unseen["baseline"]["harmful"][lang]
        ablated = unseen["ablated"]["harmful"][lang]
        random_control = unseen["random_control"]["harmful"][lang]
        assert baseline >= 0.7 and baseline - ablated >= 0.5, (lang, unseen)
        assert abs(baseline - random_control) <= 0.2, (lang, unseen)
        assert unseen["baseline"]["harmless"][lang] <= 0.1
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("baseline", "ablated", "random_control", "held_out", "unseen", "best", "seconds", "kl_harmless",
                "induced", "transfer", "by_position", "sensitivity"):
        assert key in saved
    assert len(saved["sensitivity"]["one_block"]["values"]) == model.cfg.n_layers
    assert {"sensitivity_one_block.png", "sensitivity_four_blocks.png", "report.html"} <= {p.name for p in tmp_path.iterdir()}


def test_reduced_moe_demo_every_expert_beats_combined_output_and_random_control():
    """On the MoE sibling (held-out prompts), removing the direction from every weight that writes
    the residual stream, each routed expert included, removes refusal in both languages; the same
    edit with a random direction leaves it, and so does removing it at the combined MoE outputs only."""
    from diffusion_lens.studies.refusal_demo import QUICK, run_moe_study

    moe = HookedDiffusionTransformer.from_pretrained("tiny-refusal-moe")
    out = run_moe_study(moe, QUICK, log=lambda *_: None)
    for lang in ("en", "zh"):
        baseline = out["baseline"]["harmful"][lang]
        every_expert = out["per_expert"]["harmful"][lang]
        assert baseline >= 0.7 and baseline - every_expert >= 0.5, (lang, out)
        assert abs(baseline - out["random_control"]["harmful"][lang]) <= 0.2, (lang, out)
        assert out["combined_output"]["harmful"][lang] - every_expert >= 0.5, (lang, out)
    assert out["kl_harmless"]["random_control"] < out["kl_harmless"]["per_expert"]

