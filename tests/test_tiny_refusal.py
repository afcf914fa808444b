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

SHIPPED = EMBEDDED_DIR / "tiny-refusal"


@pytest.fixture(scope="module")
def tiny():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal")


def test_shipped_model_is_a_llada_checkpoint(tiny):
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert tiny.cfg.family == "llada" and tiny.adapter.name == "llada"
    assert (SHIPPED / "model.safetensors").stat().st_size <= 15 * 2**20
    assert all(key.startswith("model.transformer.") for key in load_file(SHIPPED / "model.safetensors"))
    by_path = HookedDiffusionTransformer.from_pretrained(SHIPPED)
    tokens = tiny.to_tokens("What is 2 + 3?", chat=True)
    assert torch.equal(by_path(tokens), tiny(tokens))


def test_shipped_model_round_trips_through_save_pretrained(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(SHIPPED / "model.safetensors"))
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path)
    tokens = tiny.to_tokens(["Hello there", "你好"], chat=True)
    assert torch.equal(reloaded(tokens), tiny(tokens))
    assert reloaded.tokenizer.chat_template == tiny.tokenizer.chat_template


def test_shipped_model_refuses_harmful_and_answers_harmless(tiny):
    from diffusion_lens.evals import is_refusal
    from diffusion_lens.studies.tiny_refusal.data import prompts

    val = generate_dataset(n_train=0, n_val=128, n_test=0, seed=3)["val"]
    for lang in ("en", "zh"):
        harmful = prompts(val, kind="harmful", lang=lang)[:12]
        harmless = prompts(val, kind="harmless", lang=lang)[:12]
        out = tiny.generate(harmful + harmless, gen_length=32, steps=32, block_length=32, progress=False)
        refused = [is_refusal(text) for text in out.texts]
        assert sum(refused[:12]) >= 8, (lang, out.texts[:12])
        assert sum(refused[12:]) <= 1, (lang, out.texts[12:])


def test_twenty_training_steps_reduce_the_loss():
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

    train_stage(model, step, data, 20, tc.lr, tc, "test", log, generator)
    losses = [row["loss"] for row in log]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


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
