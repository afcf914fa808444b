"""Issue 10 item 8: TransformerLens habits work on our model: cfg fields, bias views, the cache's
residual decompositions, `transformer_lens.patching`, tokenisation helpers, and MoE errors that
reach the user."""

import einops
import pytest
import torch
import transformer_lens.patching as tl_patching

from diffusion_lens import HookedDiffusionTransformer
from tests.conftest import FIXTURES


def load(name):
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / name)


@pytest.fixture(scope="module")
def llada():
    return load("llada-tiny-mha")


@pytest.fixture(scope="module")
def shipped():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal")


def toks(n_pos=6, batch=2, seed=0):
    return torch.randint(0, 250, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ cfg
def test_cfg_has_device_n_ctx_and_act_fn(llada):
    assert llada.cfg.device == "cpu"
    assert llada.cfg.n_ctx == 64
    assert llada.cfg.act_fn == "silu"


def test_cfg_dtype_and_device_follow_the_model():
    model = load("llada-tiny-gqa")
    model.to(torch.bfloat16)
    assert model.cfg.dtype == torch.bfloat16 and "torch.bfloat16" in repr(model)
    model.half()
    assert model.cfg.dtype == torch.float16 and "torch.float16" in repr(model)
    model.float()
    assert model.cfg.dtype == torch.float32 and "torch.float32" in repr(model)
    model.to("meta")  # any device move, testable without a GPU
    assert model.cfg.device == "meta"


def test_a_model_built_from_a_config_owns_it(llada):
    cfg = llada.cfg
    cfg_dtype = cfg.dtype
    bare = HookedDiffusionTransformer(cfg)
    bare.to(torch.bfloat16)
    assert bare.cfg.dtype == torch.bfloat16 and llada.cfg.dtype == cfg_dtype  # no cross-talk
    half_cfg = HookedDiffusionTransformer(cfg).to(torch.float16).cfg
    built = HookedDiffusionTransformer(half_cfg)  # weights are created in the config's dtype
    assert built.W_E.dtype == torch.float16 and built.cfg.dtype == torch.float16


# ------------------------------------------------------------------ bias views
def test_bias_views_are_zeros_without_biases(llada):
    c = llada.cfg
    shapes = {"b_Q": (c.n_layers, c.n_heads, c.d_head), "b_K": (c.n_layers, c.n_heads, c.d_head),
              "b_V": (c.n_layers, c.n_heads, c.d_head), "b_O": (c.n_layers, c.d_model),
              "b_in": (c.n_layers, c.d_mlp), "b_out": (c.n_layers, c.d_model)}
    for name, shape in shapes.items():
        view = getattr(llada, name)
        assert view.shape == shape and not view.any(), name


def test_dream_qkv_biases_are_real_and_reproduce_hook_q_k_v():
    model = load("dream-tiny")  # q/k/v biases, GQA (4 heads, 2 kv heads)
    assert model.b_Q.abs().sum() > 0 and model.b_K.abs().sum() > 0 and model.b_V.abs().sum() > 0
    assert torch.equal(model.b_Q[0].flatten(), model.blocks[0].attn.q_proj.bias)
    assert not model.b_O.any() and not model.b_out.any()
    _, cache = model.run_with_cache(toks())
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.ln1.hook_normalized"] * model.blocks[layer].ln1.weight
        for kind in ("q", "k", "v"):
            W, b = getattr(model, f"W_{kind.upper()}")[layer], getattr(model, f"b_{kind.upper()}")[layer]
            expected = einops.einsum(x, W, "batch pos d_model, head d_model d_head -> batch pos head d_head") + b
            actual = cache[f"blocks.{layer}.attn.hook_{kind}"]
            if kind != "q":  # hooks carry kv heads; the views expand them to query heads
                actual = actual.repeat_interleave(model.cfg.n_heads // model.cfg.n_key_value_heads, dim=2)
            torch.testing.assert_close(expected, actual, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ cache decompositions
@pytest.mark.parametrize("name", ["llada-tiny-mha", "dream-tiny"])
def test_full_resid_decomposition_and_neuron_results(name):
    model = load(name)
    _, cache = model.run_with_cache(toks())
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    c = model.cfg
    assert stack.shape[0] == len(labels) == c.n_layers * (c.n_heads + c.d_mlp) + 2  # + embed, bias
    torch.testing.assert_close(stack.sum(0), cache[last], atol=1e-4, rtol=1e-4)
    normalized = cache.get_full_resid_decomposition(apply_ln=True).sum(0)  # RMS norm is linear given its scale
    torch.testing.assert_close(normalized, cache["ln_final.hook_normalized"], atol=1e-4, rtol=1e-4)
    neurons = cache.get_neuron_results(1)  # [batch pos d_mlp d_model]
    assert neurons.shape == (2, 6, c.d_mlp, c.d_model)
    torch.testing.assert_close(neurons.sum(-2), cache["blocks.1.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    stacked, neuron_labels = cache.stack_neuron_results(c.n_layers, return_labels=True)
    assert stacked.shape == (c.n_layers * c.d_mlp, 2, 6, c.d_model) and neuron_labels[0] == "L0N0"
    mlp_outs = sum(cache[f"blocks.{layer}.hook_mlp_out"] for layer in range(c.n_layers))
    torch.testing.assert_close(stacked.sum(0), mlp_outs, atol=1e-4, rtol=1e-4)


def test_moe_layers_explain_themselves():
    model = load("llada-moe-tiny")
    with pytest.raises(AttributeError, match=r"mixture-of-experts MLP.*use model\.blocks\[0\]\.mlp\.experts\[e\]"):
        model.W_in
    with pytest.raises(AttributeError, match=r"mixture of 8 experts.*use \.experts\[e\]\.W_out"):
        model.blocks[0].mlp.W_out
    assert not hasattr(model, "W_out")  # still an AttributeError for hasattr / getattr defaults
    _, cache = model.run_with_cache(toks())
    with pytest.raises(ValueError, match=r"Block\(s\) \[0, 1\] have a mixture-of-experts MLP.*expand_neurons=False"):
        cache.get_full_resid_decomposition()
    with pytest.raises(ValueError, match=r"Block\(s\) \[1\] have a mixture-of-experts MLP"):
        cache.get_neuron_results(1)
    per_mlp = cache.get_full_resid_decomposition(expand_neurons=False)  # one row per MLP works on MoE
    torch.testing.assert_close(per_mlp.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-4, rtol=1e-4)


def test_step_caches_explain_moe_layers_too():
    model = load("llada-moe-tiny")
    out = model.generate(toks(n_pos=4, batch=1), cache=dict(steps=[0, -1]), max_cache_bytes=None,
                         steps=4, gen_length=8, mask_id=310, progress=False)  # this config has no mask id
    with pytest.raises(ValueError, match=r"Block\(s\) \[0, 1\] have a mixture-of-experts MLP"):
        out.cache[-1].get_full_resid_decomposition()
    per_mlp = out.cache[0].get_full_resid_decomposition(expand_neurons=False)
    torch.testing.assert_close(per_mlp.sum(0), out.cache[0]["blocks.1.hook_resid_post"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ transformer_lens.patching
def test_transformer_lens_patching_runs_and_matches_a_hand_written_patch(llada):
    clean, corrupt = toks(n_pos=4, batch=1, seed=1), toks(n_pos=4, batch=1, seed=1)
    corrupt[0, 1] = (clean[0, 1] + 11) % 250
    metric = lambda logits: logits[0, -1, 7] - logits[0, -1, 9]  # noqa: E731
    _, clean_cache = llada.run_with_cache(clean)
    n_layers, n_heads = llada.cfg.n_layers, llada.cfg.n_heads

    def patched(name, index):
        def hook(act, hook):
            act = act.clone()
            act[index] = clean_cache[name][index]
            return act
        return metric(llada.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])).item()

    resid = tl_patching.get_act_patch_resid_pre(llada, corrupt, clean_cache, metric)
    assert resid.shape == (n_layers, 4)
    assert resid[1, 1].item() == pytest.approx(patched("blocks.1.hook_resid_pre", (slice(None), 1)), abs=1e-5)

    heads = tl_patching.get_act_patch_attn_head_out_by_pos(llada, corrupt, clean_cache, metric)
    assert heads.shape == (n_layers, 4, n_heads)
    assert heads[0, 1, 2].item() == pytest.approx(patched("blocks.0.attn.hook_z", (slice(None), 1, 2)), abs=1e-5)

    every = tl_patching.get_act_patch_block_every(llada, corrupt, clean_cache, metric)
    assert every.shape == (3, n_layers, 4)
    torch.testing.assert_close(every[0], resid)
    assert every[2, 2, 3].item() == pytest.approx(patched("blocks.2.hook_mlp_out", (slice(None), 3)), abs=1e-5)


# ------------------------------------------------------------------ tokenisation helpers
def test_to_str_tokens_gives_one_list_per_row(shipped):
    batch = shipped.to_tokens(["Hi", "Tell me a joke"])
    rows = shipped.to_str_tokens(batch)
    assert rows == [shipped.to_str_tokens(batch[0]), shipped.to_str_tokens(batch[1])]
    assert rows[1] == ["Tell", " me", " a", " joke"]
    assert shipped.to_str_tokens(batch[1:]) == rows[1]  # [1 pos] is one sequence, as in TransformerLens
    assert shipped.to_str_tokens("Tell me a joke") == rows[1]
    assert shipped.to_str_tokens(["Tell me a joke", "Hi"]) == [rows[1], shipped.to_str_tokens("Hi")]  # no padding


def test_get_token_position(shipped):
    tokens = shipped.to_tokens("Tell me a joke, a good joke")
    joke = shipped.to_single_token(" joke")
    assert shipped.get_token_position(" joke", tokens) == 3
    assert shipped.get_token_position(joke, tokens[0], mode="last") == tokens[0].tolist().index(joke, 4)
    assert shipped.get_token_position(" joke", "Tell me a joke") == 3
    with pytest.raises(ValueError, match=r"Token \d+ \(' me'\) does not occur in the input"):
        shipped.get_token_position(" me", "Hi")
    with pytest.raises(ValueError, match="searches one sequence; got 2 rows"):
        shipped.get_token_position(joke, tokens.repeat(2, 1))
