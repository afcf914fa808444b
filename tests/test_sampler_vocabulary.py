"""Issue 10, items 4 (sampler side) and 5: one sampler vocabulary across families (gen_length /
max_new_tokens, block_length following the response, steps <= response length), determinism at
temperature 0 without a seed, reproducibility under seed=, and the padded-batch warning for
models that ignore the attention mask."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.denoising import DreamSampler, LLaDASampler, MMaDASampler
from tests._denoising import golden_run, load_model
from tests.conftest import FIXTURES

FAMILIES = ["llada-tiny-mha", "mmada-tiny", "dream-tiny", "llada-moe-tiny"]
PROMPT = torch.tensor([[5, 17, 42, 8, 99, 3]])


def family(name):
    model = load_model(name)
    extra = {} if model.cfg.mask_token_id is not None else dict(mask_id=310)  # the MoE fixture has no mask id
    return model, extra


# ------------------------------------------------------------------ item 4
@pytest.mark.parametrize("name", FAMILIES)
def test_one_script_runs_unchanged_on_every_family(name):
    model, extra = family(name)
    by_gen_length = model.generate(PROMPT, steps=8, gen_length=16, progress=False, **extra)
    by_max_new_tokens = model.generate(PROMPT, steps=8, max_new_tokens=16, progress=False, **extra)
    with_block = model.generate(PROMPT, steps=8, gen_length=16, block_length=16, progress=False, **extra)
    assert by_gen_length.sequences.shape == (1, 6 + 16) and by_gen_length.trajectory.shape[0] == 8
    assert torch.equal(by_gen_length.sequences, by_max_new_tokens.sequences)
    assert torch.equal(by_gen_length.sequences, with_block.sequences)


@pytest.mark.parametrize("sampler", [LLaDASampler(), MMaDASampler(), DreamSampler()], ids=lambda s: type(s).__name__)
def test_aliases_live_in_with_options(sampler):
    assert sampler.with_options(gen_length=32, steps=32).response_length() == 32
    assert sampler.with_options(max_new_tokens=32, steps=32).response_length() == 32
    assert sampler.with_options(gen_length=32, max_new_tokens=32, steps=32).response_length() == 32
    with pytest.raises(ValueError, match="gen_length=32 and max_new_tokens=64 disagree; both name the response length"):
        sampler.with_options(gen_length=32, max_new_tokens=64)
    with pytest.raises(TypeError, match="no option 'gen_lenght'.*also accepted as gen_length or max_new_tokens"):
        sampler.with_options(gen_lenght=32)


def test_block_length_follows_the_response_length_and_keeps_upstream_defaults():
    model, golden = load_model("llada-tiny-mha"), golden_run("llada-tiny-mha", "gen_one_block")
    assert golden["kwargs"] == dict(steps=16, gen_length=16, block_length=16)
    out = model.generate(golden["prompt"], steps=16, gen_length=16, progress=False)  # was "multiple of block_length=128"
    assert torch.equal(out.trajectory, golden["trajectory"]) and torch.equal(out.sequences, golden["output"])
    default = model.adapter.sampler(model.cfg)
    assert (default.gen_length, default.block_size(), default.n_blocks()) == (128, 128, 1)  # upstream's one block
    assert LLaDASampler(steps=32, gen_length=64, block_length=32).n_blocks() == 2


def test_block_length_on_a_sampler_without_blocks():
    model, _ = family("dream-tiny")
    one_block = model.generate(PROMPT, steps=8, max_new_tokens=16, block_length=16, progress=False)
    assert torch.equal(one_block.sequences, model.generate(PROMPT, steps=8, max_new_tokens=16, progress=False).sequences)
    # Dream has blocks only in Fast-dLLM's block sampler (issue 12), i.e. with a KV cache
    with pytest.raises(ValueError, match="block_length=8 needs kv_cache=: Dream's sampler without a KV cache "
                                         "denoises the whole response as one block"):
        model.generate(PROMPT, steps=8, gen_length=16, block_length=8, progress=False)
    blocks = model.generate(PROMPT, steps=8, gen_length=16, block_length=8, kv_cache="prefix", alg="entropy",
                            progress=False, record=True)
    assert [state.block for state in blocks.states] == [0] * 4 + [1] * 4


@pytest.mark.parametrize("name", FAMILIES)
def test_more_steps_than_response_positions_is_an_error(name):
    model, extra = family(name)
    with pytest.raises(ValueError, match=r"steps=32 is more than the response length \(16 positions\): a step commits "
                                         r"at least one token, so 16 forwards would be wasted"):
        model.generate(PROMPT, steps=32, gen_length=16, block_length=16, progress=False, **extra)


# ------------------------------------------------------------------ item 5
@pytest.mark.parametrize("name, options", [
    ("dream-tiny", dict(alg="origin")),                       # upstream draws its commits from the RNG
    ("llada-tiny-mha", dict(remasking="random", block_length=8)),
])
def test_temperature_zero_is_deterministic_without_a_seed(name, options):
    model, _ = family(name)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        runs.append(model.generate(PROMPT, steps=8, gen_length=16, progress=False, **options).trajectory)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name, options", [
    ("dream-tiny", dict(alg="entropy", temperature=0.8)),
    ("dream-tiny", dict(alg="maskgit_plus", alg_temp=0.5)),
    ("llada-tiny-mha", dict(temperature=0.8, remasking="random", block_length=8)),
])
def test_seed_reproduces_any_temperature_and_unseeded_sampling_uses_the_global_rng(name, options):
    model, _ = family(name)
    kwargs = dict(steps=8, gen_length=16, progress=False, **options)
    first, again = (model.generate(PROMPT, seed=5, **kwargs).trajectory for _ in range(2))
    assert torch.equal(first, again)
    unseeded = []
    for _ in range(2):
        torch.manual_seed(5)  # upstream seeding: the same global state gives the same sample
        unseeded.append(model.generate(PROMPT, **kwargs).trajectory)
    assert torch.equal(unseeded[0], unseeded[1]) and torch.equal(unseeded[0], first)


def test_seed_and_generator_together_is_an_error():
    model, _ = family("llada-tiny-mha")
    with pytest.raises(ValueError, match="Pass seed= or generator=, not both"):
        model.generate(PROMPT, steps=8, gen_length=16, seed=1, generator=torch.Generator().manual_seed(1), progress=False)


def test_padded_batch_warns_when_the_model_ignores_the_attention_mask():
    folder = FIXTURES / "llada-moe-tiny"
    model = HookedDiffusionTransformer.from_pretrained(folder)
    assert model.cfg.attention_mask_mode == "ignored"
    golden = load_file(folder / "golden_generate.safetensors")
    prompt = golden["gen_semi_ar.prompt"]
    padded = torch.ones_like(prompt)
    padded[0, :2] = 0
    run = dict(steps=8, gen_length=16, mask_id=310, progress=False)
    with pytest.warns(UserWarning, match=r"ignores the attention mask \(cfg.attention_mask_mode='ignored'"):
        model.generate(prompt, attention_mask=padded, **run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **run)  # no padding: no warning
        llada = load_model("llada-tiny-mha")  # honours the mask: no warning
        llada.generate(prompt, attention_mask=padded, steps=8, gen_length=16, progress=False)
