"""Issue 13 (item 2): hooks select by model pass (`H.at(..., passes=)`, `hook.pass_name`), in plain
forwards and in `generate`; a forward whose logits nobody reads skips the LM head; fp32 logits.

On the DiffusionGemma fixture (passes "encoder" / "decoder") and on a one-pass LLaDA fixture.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens import hooks as H
from diffusion_lens.core.kv_cache import KVCache
from tests.conftest import FIXTURES

PROMPT = torch.tensor([[2, 65, 149, 131, 203, 211]])


@pytest.fixture(scope="module")
def gemma():
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny")


@pytest.fixture(scope="module")
def llada():
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")


def _counter(seen: list):
    def fn(act, hook):
        seen.append((hook.name, hook.pass_name))
    return fn


def test_plain_forwards_select_hooks_by_pass(gemma):
    """An encoder-only hook fires in the encoder forward and not in the decoder's, and the reverse."""
    seen_enc, seen_dec, seen_all = [], [], []
    hooks = [H.at("blocks.0.hook_resid_post", _counter(seen_enc), passes="encoder"),
             H.at("blocks.0.hook_resid_post", _counter(seen_dec), passes=["decoder"]),
             H.at("blocks.0.hook_resid_post", _counter(seen_all))]
    with gemma.hooks(fwd_hooks=hooks):
        gemma(PROMPT, pass_name="decoder")
        gemma(PROMPT)  # the default pass: the encoder
    assert seen_enc == [("blocks.0.hook_resid_post", "encoder")]
    assert seen_dec == [("blocks.0.hook_resid_post", "decoder")]
    assert [p for _, p in seen_all] == ["decoder", "encoder"]


def test_a_pass_filtered_edit_changes_only_its_pass(gemma):
    zero = H.at("blocks.1.hook_resid_post", lambda act, hook: act * 0, passes="decoder")
    for pass_name, changed in (("encoder", False), ("decoder", True)):
        clean = gemma(PROMPT, pass_name=pass_name)
        steered = gemma.run_with_hooks(PROMPT, pass_name=pass_name, fwd_hooks=[zero])
        assert (not torch.equal(clean, steered)) == changed


def test_unknown_passes_are_refused_when_installed(gemma, llada):
    with pytest.raises(ValueError, match=r"passes=\['prefill'\].*runs the passes \('encoder', 'decoder'\)"):
        gemma.run_with_hooks(PROMPT, fwd_hooks=[H.at("hook_embed", lambda a, h: None, passes="prefill")])
    with pytest.raises(ValueError, match="runs one pass"):
        llada.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[H.at("hook_embed", lambda a, h: None, passes="decoder")])
    with pytest.raises(ValueError, match="runs one pass"):
        llada.generate(torch.tensor([[1, 2, 3]]), hooks=[H.at("hook_embed", lambda a, h: None, passes="decoder")],
                       steps=2, gen_length=4, block_length=4, chat=False, progress=False)
    assert not any(p.fwd_hooks for p in gemma.hook_dict.values())  # nothing leaked
    with pytest.raises(TypeError, match="pass name"):
        H.at("hook_embed", lambda a, h: None, passes=[])


def test_generate_runs_pass_filtered_hooks_at_their_passes_only(gemma):
    steps = {"encoder": [], "decoder": []}

    def record(act, hook):
        steps[hook.state.pass_name].append(hook.state.step)

    hooks = [H.at("blocks.0.hook_resid_pre", record, passes="encoder"),
             H.at("blocks.0.hook_resid_pre", record, passes="decoder")]
    torch.manual_seed(0)
    out = gemma.generate(PROMPT, hooks=hooks, max_new_tokens=32, max_denoising_steps=3, chat=False,
                         progress=False, record=True)
    by_pass = {"encoder": [], "decoder": []}
    for state in out.states:
        by_pass[state.pass_name].append(state.step)
    assert steps == by_pass and steps["encoder"] and steps["decoder"]


def test_the_encoder_pass_skips_the_lm_head_unless_its_logits_are_asked_for(gemma):
    """The sampler ignores the encoder's logits: no [pos vocab] product there (the bench's encoder row);
    `capture_logits` at an encoder step still gets them, equal to a plain encoder forward's."""
    calls = []
    handle = gemma.unembed.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    try:
        torch.manual_seed(0)
        out = gemma.generate(PROMPT, max_new_tokens=16, max_denoising_steps=2, chat=False, progress=False,
                             record=True, capture_logits=[0])
    finally:
        handle.remove()
    encoder_steps = [s.step for s in out.states if s.pass_name == "encoder"]
    decoder_steps = [s.step for s in out.states if s.pass_name == "decoder"]
    assert encoder_steps == [0] and calls == [PROMPT.shape[1]] + [16] * len(decoder_steps)
    cache = KVCache.empty(gemma.cfg, batch=1, n_pos=PROMPT.shape[1] + 16, like=gemma.W_E)
    mask = torch.ones(1, PROMPT.shape[1] + 16, dtype=torch.long)
    torch.testing.assert_close(out.logits[0], gemma(PROMPT, mask, kv_cache=cache, pass_name="encoder"))


def test_return_type_none_fires_every_hook_but_skips_the_lm_head(gemma):
    fired = []
    handle = gemma.unembed.register_forward_hook(lambda *args: fired.append("unembed"))
    try:
        with gemma.hooks(fwd_hooks=[("hook_unembed_in", lambda act, hook: fired.append(hook.name)),
                                    ("ln_final.hook_normalized", lambda act, hook: fired.append(hook.name))]):
            assert gemma(PROMPT, return_type=None) is None
            gemma(PROMPT)
    finally:
        handle.remove()
    assert fired == ["ln_final.hook_normalized", "hook_unembed_in"] * 2 + ["unembed"]


def test_hook_unembed_in_is_what_the_lm_head_reads(llada):
    tokens = torch.tensor([[1, 2, 3, 4]])
    logits, cache = llada.run_with_cache(tokens, names_filter="hook_unembed_in")
    torch.testing.assert_close(logits, llada.unembed(cache["hook_unembed_in"]))


def test_logits_in_fp32_upcast_a_bf16_model_before_the_softcap(gemma):
    """§4.6: fp32(y @ E^T), then the softcap: a bf16 model returns fp32 logits, the softcap in fp32."""
    bf16 = HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny", dtype=torch.bfloat16)
    assert bf16.cfg.logits_in_fp32
    logits, cache = bf16.run_with_cache(PROMPT, names_filter="hook_unembed_in")
    assert logits.dtype == torch.float32
    cap = bf16.cfg.final_logit_softcap
    expected = torch.tanh(bf16.unembed(cache["hook_unembed_in"]).float() / cap) * cap
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
