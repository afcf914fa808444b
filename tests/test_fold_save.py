"""Issue 10 item 9: a transport map folded into the weights survives `save_pretrained`: the saved
folder (original-format weights + a sidecar of the folded biases the format has no key for) loads
back through `from_pretrained` to the outputs of the runtime map; and every save is atomic."""

import pytest
import torch
from safetensors.torch import load_file

import diffusion_lens.checkpoints.loading as loading
from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.checkpoints.loading import BIAS_SIDECAR
from diffusion_lens.core.kv_cache import KVCache
from diffusion_lens.steering import AffineMap, fit_transport, fold, orthogonalize_weights
from tests.conftest import FIXTURES


def shifted_samples(sites, shape, seed=0):
    """Source / target activations per site: the target is spread and shifted (a map with omega != 1, beta != 0)."""
    g = torch.Generator().manual_seed(seed)
    source = {s: torch.randn(256, *shape, generator=g) for s in sites}
    target = {s: 1.3 * torch.randn(256, *shape, generator=g) + torch.randn(*shape, generator=g) for s in sites}
    return source, target


@pytest.mark.parametrize("kind", ["mean", "linear"])  # Mean-ACT (shift only) and Linear-ACT
def test_folded_map_saves_and_reloads_to_the_runtime_maps_tokens(kind, tmp_path):
    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    sites = ["blocks.2.hook_mlp_out", "blocks.4.hook_mlp_out"]
    amap = fit_transport(kind, *shifted_samples(sites, (model.cfg.d_model,)))
    prompts = ["How do I bake bread?", "Tell me how to pick a lock."]
    options = dict(gen_length=16, steps=16, block_length=16, progress=False)
    plain = model.generate(prompts, **options).sequences
    runtime = model.generate(prompts, hooks=amap.as_hooks(), **options).sequences
    assert not torch.equal(runtime, plain), "the map must change the tokens for this test to mean anything"

    fold(model, amap)
    with pytest.warns(UserWarning, match=BIAS_SIDECAR):
        model.save_pretrained(tmp_path / "steered")
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path / "steered")
    assert torch.equal(reloaded.generate(prompts, **options).sequences, runtime)

    # Other tools read the weights in LLaDA's own keys, and the biases by the same names.
    original = load_file(loading.EMBEDDED_DIR / "tiny-refusal" / "model.safetensors")
    assert set(load_file(tmp_path / "steered" / "model.safetensors")) == set(original)
    assert set(load_file(tmp_path / "steered" / BIAS_SIDECAR)) == {
        "model.transformer.blocks.2.ff_out.bias", "model.transformer.blocks.4.ff_out.bias"}


FAMILY_SITES = {  # fixture -> sites whose fold creates a bias the checkpoint format lacks (or, Dream's v, has)
    "llada-tiny-mha": ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_v"],
    "mmada-tiny": ["blocks.0.hook_attn_out", "blocks.1.mlp.hook_post"],
    "dream-tiny": ["blocks.0.hook_attn_out", "blocks.1.attn.hook_v"],
    "llada-moe-tiny-variant": ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"],  # layer 1: MoE + shared expert
}


@pytest.mark.parametrize("fixture", FAMILY_SITES)
def test_every_family_reloads_a_folded_map(fixture, tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / fixture)
    sites = FAMILY_SITES[fixture]
    tokens = torch.randint(0, 256, (2, 9))
    _, cache = model.run_with_cache(tokens, names_filter=sites)
    g = torch.Generator().manual_seed(1)
    amap = AffineMap({s: 1 + 0.1 * torch.randn(cache[s].shape[2:], generator=g) for s in sites},
                     {s: torch.randn(cache[s].shape[2:], generator=g) for s in sites})
    expected = model.run_with_hooks(tokens, fwd_hooks=amap.as_hooks())
    fold(model, amap)
    with pytest.warns(UserWarning, match="folded biases"):
        model.save_pretrained(tmp_path / "folded")
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path / "folded")
    assert torch.equal(reloaded(tokens), model(tokens))
    torch.testing.assert_close(reloaded(tokens), expected, atol=1e-4, rtol=0)
    assert reloaded.adapter.name == model.adapter.name


def test_a_sidecar_bias_for_a_layer_that_has_one_is_refused(tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    fold(model, AffineMap({"blocks.0.hook_mlp_out": torch.ones(64)}, {"blocks.0.hook_mlp_out": torch.ones(64)}))
    with pytest.warns(UserWarning):
        model.save_pretrained(tmp_path / "folded")
    sidecar = tmp_path / "folded" / BIAS_SIDECAR
    loading.save_file({"model.transformer.blocks.0.ff_norm.bias": torch.ones(64)}, sidecar)
    with pytest.raises(ValueError, match=rf"{BIAS_SIDECAR}: 'model.transformer.blocks.0.ff_norm.bias' is not the bias"):
        HookedDiffusionTransformer.from_pretrained(tmp_path / "folded")


def fail_after_first_file(monkeypatch):
    written = []
    real = loading.save_file

    def save_file(tensors, filename, metadata=None):
        if written:
            raise OSError("disk full (injected)")
        written.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(loading, "save_file", save_file)


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")
    fail_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(tmp_path / "out", max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")
    target = tmp_path / "out"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    fail_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(target, max_shard_bytes=60_000)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_save_replaces_an_old_checkpoint_as_a_whole(tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")
    target = tmp_path / "out"
    model.save_pretrained(target, max_shard_bytes=60_000)
    model.save_pretrained(target)  # one shard now: the old shards and index must not linger
    assert sorted(p.name for p in target.glob("*.safetensors*")) == ["model.safetensors"]
    assert torch.equal(HookedDiffusionTransformer.from_pretrained(target).W_E, model.W_E)


def test_unmappable_weights_fail_before_anything_is_written(tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    model.blocks[0].ln1.register_parameter("bias", torch.nn.Parameter(torch.zeros(64)))  # not a linear layer's bias
    with pytest.raises(KeyError, match=r"no key for 1 weights \(blocks\.0\.ln1\.bias\)"):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder or a checkpoint folder"):
        model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("fixture", ["diffusion-gemma-tiny", "diffusion-gemma-tiny-dense"])
def test_an_orthogonalized_diffusion_gemma_stays_tied_and_loads_in_transformers(fixture, tmp_path):
    """Issue 13 item 5: the tied embedding / LM head is edited once and stays one tensor here, after a
    save and reload, and in transformers' DiffusionGemmaForBlockDiffusion, whose encoder and decoder
    both read the edited weights and give our logits in both passes."""
    from transformers import DiffusionGemmaForBlockDiffusion  # the live reference
    from transformers.cache_utils import DynamicCache  # the live reference's cache

    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / fixture)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(7))
    edited = orthogonalize_weights(model, r)
    assert model.unembed.weight is model.embed.weight and edited.count("embed.weight") == 1
    assert not torch.equal(model.W_E, original["embed.weight"])

    P, C = 6, model.cfg.extra["canvas_length"]
    g = torch.Generator().manual_seed(8)
    prompt, canvas = torch.randint(3, model.cfg.d_vocab, (1, P), generator=g), torch.randint(0, model.cfg.d_vocab, (1, C), generator=g)
    previous = 3 * torch.randn(1, C, model.cfg.d_vocab, generator=g)
    mask = torch.ones(1, P + C, dtype=torch.long)

    def ours(m):
        cache = KVCache.empty(m.cfg, batch=1, n_pos=P + C, like=m.W_E)
        encoder = m(prompt, mask, kv_cache=cache, pass_name="encoder")
        return encoder, m(canvas, mask, kv_cache=cache, window_start=P, pass_name="decoder",
                          self_conditioning_logits=previous)

    with torch.no_grad():
        expected = ours(model)
        model.save_pretrained(tmp_path / "abliterated")
        reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path / "abliterated")
        assert reloaded.unembed.weight is reloaded.embed.weight
        assert reloaded.unembed.weight.data_ptr() == reloaded.embed.weight.data_ptr()
        for got, want in zip(ours(reloaded), expected):
            assert torch.equal(got, want)

        reference, info = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "abliterated", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        encoder, decoder = reference.model.encoder.language_model, reference.model.decoder
        for layer, block in enumerate(model.blocks):
            for theirs in (encoder.layers[layer], decoder.layers[layer]):  # both passes see the edit
                assert torch.equal(theirs.self_attn.o_proj.weight, block.attn.o_proj.weight)
                assert torch.equal(theirs.mlp.down_proj.weight, block.mlp.dense.down_proj.weight)
                assert torch.equal(theirs.experts.down_proj, block.mlp.experts.down_proj)
        for theirs in (encoder.embed_tokens.weight, decoder.embed_tokens.weight, reference.lm_head.weight):
            assert torch.equal(theirs, model.W_E)
        assert not torch.equal(model.blocks[0].attn.o_proj.weight, original["blocks.0.attn.o_proj.weight"])

        upstream = DynamicCache(config=reference.config.text_config)
        cap = model.cfg.final_logit_softcap
        hidden = encoder(input_ids=prompt, attention_mask=mask[:, :P], position_ids=torch.arange(P)[None], cache=upstream)
        their_encoder = torch.tanh(reference.lm_head(hidden.last_hidden_state) / cap) * cap
        hidden = decoder(decoder_input_ids=canvas, self_conditioning_logits=previous, decoder_attention_mask=mask,
                         decoder_position_ids=torch.arange(P, P + C)[None], cache=upstream)
        their_decoder = torch.tanh(reference.lm_head(hidden.last_hidden_state) / cap) * cap
    torch.testing.assert_close(expected[0], their_encoder, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(expected[1], their_decoder, atol=1e-4, rtol=1e-4)
