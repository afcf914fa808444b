"""Issue 3: step-aware caching: `run_with_cache(step=...)`, `generate(cache=...)` / `StepCache`,
the exact size estimate and the memory guard, and the `StreamingMean` reducer."""

import pytest
import torch

from diffusion_lens import hooks as H
from diffusion_lens.denoising import CacheTooLargeError, StepCache, StreamingMean
from tests._denoising import golden_run, load_model

NAME = "llada-tiny-gqa"
RESID = "blocks.1.hook_resid_post"


def padded():
    model, golden = load_model(NAME), golden_run(NAME, "gen_padded")
    return model, golden, dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])


def canvas_entering(golden, step):
    if step == 0:
        return torch.cat([golden["prompt"], torch.full((2, 16), golden["mask_id"])], 1)
    return golden["trajectory"][step - 1]


@pytest.mark.parametrize("step", [0, 3, 5, 7])
def test_run_with_cache_at_step_equals_plain_forward_on_that_canvas(step):
    model, golden, kwargs = padded()
    logits, cache = model.run_with_cache(golden["prompt"], step=step, names_filter=lambda n: "resid" in n, **kwargs)
    full_mask = torch.cat([golden["attention_mask"], torch.ones(2, 16, dtype=torch.long)], 1)
    plain_logits, plain = model.run_with_cache(canvas_entering(golden, step), full_mask, names_filter=lambda n: "resid" in n)
    assert torch.equal(logits, plain_logits)
    assert sorted(cache.keys()) == sorted(plain.keys())
    for name in plain.keys():
        assert torch.equal(cache[name], plain[name]), name
    assert cache.accumulated_resid().shape[0] == model.cfg.n_layers + 1  # TransformerLens analysis works


def test_run_with_cache_list_of_steps_and_plain_path_unchanged():
    model, golden, kwargs = padded()
    logits, cache = model.run_with_cache(golden["prompt"], step=[5, 0], names_filter=[RESID], **kwargs)
    assert isinstance(cache, StepCache) and cache.steps == [0, 5] and sorted(logits) == [0, 5]
    full_mask = torch.cat([golden["attention_mask"], torch.ones(2, 16, dtype=torch.long)], 1)
    for step in (0, 5):
        assert torch.equal(logits[step], model(canvas_entering(golden, step), full_mask))
    plain_logits, plain_cache = model.run_with_cache(golden["prompt"], names_filter=[RESID])
    assert plain_logits.shape == (2, 6, model.cfg.d_vocab_out) and plain_cache[RESID].shape == (2, 6, 64)


def test_generate_cache_holds_exactly_requested_steps_names_positions():
    model, golden, kwargs = padded()
    out = model.generate(golden["prompt"], cache=dict(names="blocks.*.hook_resid_post", steps=[0, 5]), **kwargs)
    assert torch.equal(out.sequences, golden["output"])  # caching does not perturb the run
    cache = out.cache
    assert cache.steps == [0, 5] and list(cache.store) == [0, 5]
    assert set(cache.names) == {f"blocks.{l}.hook_resid_post" for l in range(3)}
    assert all(set(cache.store[s]) == set(cache.names) for s in cache.steps)
    assert 3 not in cache and 5 in cache
    with pytest.raises(KeyError, match="not cached"):
        cache[3]
    assert cache.stack(RESID).shape == (2, 2, 22, 64)
    _, at5 = model.run_with_cache(golden["prompt"], step=5, names_filter=[RESID], **kwargs)
    assert torch.equal(cache[5][RESID], at5[RESID])

    response = model.generate(golden["prompt"], cache=dict(names=[RESID, "blocks.0.attn.hook_pattern"], steps=[5],
                                                           positions="response"), **kwargs).cache
    # caching a pattern switches attention to the explicit path: equal to SDPA within 1e-5
    torch.testing.assert_close(response[5][RESID], at5[RESID][:, 6:], rtol=1e-5, atol=1e-5)
    assert response[5]["blocks.0.attn.hook_pattern"].shape == (2, 4, 16, 22)  # query positions kept, all keys
    assert response.positions.tolist() == list(range(6, 22))
    index = model.generate(golden["prompt"], cache=dict(names=[RESID], steps=[5], positions=[0, -1]), **kwargs).cache
    assert torch.equal(index[5][RESID], at5[RESID][:, [0, 21]])
    with pytest.raises(ValueError, match="cannot be stored"):
        model.generate(golden["prompt"], cache=dict(names=[RESID], positions="masked"), **kwargs)


def test_cache_device_dtype_and_to():
    model, golden, kwargs = padded()
    cache = model.generate(golden["prompt"], cache=dict(names=[RESID, "blocks.0.ln1.hook_scale"], steps=[1],
                                                        dtype=torch.float16, device="cpu"), **kwargs).cache
    assert cache[1][RESID].dtype == torch.float16 and cache[1]["blocks.0.ln1.hook_scale"].dtype == torch.float16
    moved = cache.to("cpu", dtype=torch.float64)
    assert moved[1][RESID].dtype == torch.float64 and cache[1][RESID].dtype == torch.float16


@pytest.mark.parametrize("request_", [
    dict(names="blocks.*.hook_resid_post", steps=[0, 5]),
    dict(names=["blocks.0.attn.hook_pattern", "blocks.2.attn.hook_k", "ln_final.hook_scale", "blocks.1.mlp.hook_post"],
         steps=[1, 2, 7], positions="response"),
    dict(names=["blocks.0.attn.hook_q", "blocks.1.ln2.hook_scale", "hook_embed"], steps=None, positions=[1, 3],
         dtype=torch.float16),
    dict(names=["blocks.1.attn.hook_result", RESID], steps=[0]),  # hook_result does not fire (off): 0 bytes
])
def test_estimate_is_exact(request_):
    model, golden, kwargs = padded()
    predicted = model.estimate_cache_bytes(golden["prompt"], cache=request_, **golden["kwargs"])
    assert predicted == model.estimate_cache_bytes((2, 6), cache=request_, **golden["kwargs"])
    out = model.generate(golden["prompt"], cache=request_, **kwargs)
    assert out.cache.nbytes == predicted > 0


def test_estimate_with_cfg_rows():
    model, golden = load_model(NAME), golden_run(NAME, "gen_cfg")
    kwargs = dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    for include in (False, True):
        spec = dict(names=[RESID], steps=[0, 1], include_unconditional=include)
        out = model.generate(golden["prompt"], cache=spec, **kwargs)
        assert out.cache[0][RESID].shape[0] == (4 if include else 2)
        assert out.cache.nbytes == model.estimate_cache_bytes(golden["prompt"], cache=spec, **golden["kwargs"])


def test_memory_guard_refuses_before_running_with_useful_message():
    model, golden, kwargs = padded()
    spec = dict(names="blocks.*.hook_resid_post", steps=None)
    predicted = model.estimate_cache_bytes(golden["prompt"], cache=spec, **golden["kwargs"])
    per_step = predicted // 8
    fired = []
    with pytest.raises(CacheTooLargeError) as info:
        model.generate(golden["prompt"], cache=spec, max_cache_bytes=3 * per_step,
                       hooks=[("hook_embed", lambda a, hook: fired.append(1))], **kwargs)
    message = str(info.value)
    assert fired == []  # refused before any forward
    assert info.value.estimated_bytes == predicted and info.value.limit == 3 * per_step
    assert f"{predicted / 1024:.1f} KiB" in message
    assert "3 names x 8 steps x 2 rows x 22 positions" in message
    assert "steps=[0, 1, 2] (3 of 8 steps, 99.0 KiB)" in message
    assert "names=['blocks.0.hook_resid_post'] (1 of 3 names, 88.0 KiB)" in message
    assert "positions='response'" not in message  # 192 KiB would not fit either
    assert "max_cache_bytes=None" in message and "StreamingMean" in message
    with pytest.raises(CacheTooLargeError, match=r"positions='response' \(192.0 KiB\)"):
        model.generate(golden["prompt"], cache=spec, max_cache_bytes=200 * 1024, **kwargs)
    ok = model.generate(golden["prompt"], cache=dict(spec, steps=[0, 1, 2]), max_cache_bytes=3 * per_step, **kwargs)
    assert ok.cache.nbytes == 3 * per_step
    unguarded = model.generate(golden["prompt"], cache=spec, max_cache_bytes=None, **kwargs)
    assert unguarded.cache.nbytes == predicted
    with pytest.raises(CacheTooLargeError, match="max_cache_bytes"):
        model.run_with_cache(golden["prompt"], step=2, max_cache_bytes=100, **kwargs)


def test_streaming_mean_matches_cached_activations():
    model, golden, kwargs = padded()
    names = ["blocks.0.hook_resid_post", RESID]
    pooled = StreamingMean(names, positions="prompt", steps=[0, 3])
    per_step = StreamingMean(RESID, positions="masked", steps=[0, 3], by_step=True)
    columns = StreamingMean(RESID, positions="prompt", steps=0, per_position=True)
    out = model.generate(golden["prompt"], reducers=[pooled, per_step, columns],
                         cache=dict(names=names, steps=[0, 3]), **kwargs)
    assert torch.equal(out.sequences, golden["output"])
    real_prompt = golden["attention_mask"].bool()  # [2 6]: pads excluded
    for name in names:
        acts = torch.cat([out.cache[s][name][:, :6][real_prompt] for s in (0, 3)]).double()
        assert pooled.count(name) == acts.shape[0] == 2 * int(real_prompt.sum())
        torch.testing.assert_close(pooled.mean(name), acts.mean(0), rtol=0, atol=1e-12)
        assert pooled.mean(name).dtype == torch.float64
    for step in (0, 3):
        masked = canvas_entering(golden, step) == golden["mask_id"]
        expected = out.cache[step][RESID][masked].double()
        torch.testing.assert_close(per_step.mean(RESID, step=step), expected.mean(0), rtol=0, atol=1e-12)
        assert per_step.count(RESID, step=step) == int(masked.sum())
    assert columns.count(RESID).tolist() == real_prompt.sum(0).tolist()  # per column, pads excluded
    cached = out.cache[0][RESID][:, :6].double() * real_prompt[..., None]
    expected = cached.sum(0)[1:] / real_prompt.sum(0)[1:, None]
    torch.testing.assert_close(columns.mean(RESID)[1:], expected, rtol=0, atol=1e-12)
    assert columns.mean(RESID).shape == (6, 64)


def test_streaming_mean_accumulates_across_calls_and_plain_forwards():
    model, golden, kwargs = padded()
    r = StreamingMean(RESID, positions="response", steps=0)
    for _ in range(3):
        model.generate(golden["prompt"], reducers=[r], **kwargs)
    once = StreamingMean(RESID, positions="response", steps=0)
    model.generate(golden["prompt"], reducers=[once], **kwargs)
    assert r.count(RESID) == 3 * once.count(RESID) == 3 * 2 * 16
    torch.testing.assert_close(r.mean(RESID), once.mean(RESID), rtol=0, atol=1e-12)
    assert r.sum(RESID).shape == (64,)

    plain = StreamingMean(RESID, positions=[0, 1, 2, 3, 4, 5])
    valid = golden["attention_mask"]
    model.run_with_hooks(golden["prompt"], valid, fwd_hooks=plain.hooks(mask=valid))
    _, cache = model.run_with_cache(golden["prompt"], valid, names_filter=[RESID])
    torch.testing.assert_close(plain.mean(RESID), cache[RESID][valid.bool()].double().mean(0), rtol=0, atol=1e-12)
    r.reset()
    with pytest.raises(KeyError, match="Nothing accumulated"):
        r.mean(RESID)


def test_hooks_and_cache_together_cache_sees_steered_activations():
    model, golden, kwargs = padded()
    spec = dict(names=[RESID], steps=[4])
    steer = H.at(RESID, lambda a, hook: a * 0.0, steps=4, positions="response")
    out = model.generate(golden["prompt"], hooks=[steer], cache=spec, **kwargs)
    assert (out.cache[4][RESID][:, 6:] == 0).all() and (out.cache[4][RESID][:, :6] != 0).any()


def test_moe_expert_hooks_cached_whole_without_the_guard():
    """Expert hooks are [n_routed ...]: no size estimate (guard refuses them), stored whole with
    max_cache_bytes=None, refused up front for a position subset."""
    from diffusion_lens import HookedDiffusionTransformer
    from tests.conftest import FIXTURES

    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-moe-tiny-variant")
    golden = golden_run("llada-moe-tiny-variant", "gen_semi_ar")
    run = dict(mask_id=golden["mask_id"], progress=False, **golden["kwargs"])
    name, weights = "blocks.1.mlp.experts.0.hook_post", "blocks.1.mlp.hook_expert_weights"
    with pytest.raises(ValueError, match="experts.0.hook_post"):
        model.generate(golden["prompt"], cache=dict(names=[name], steps=[0]), **run)
    out = model.generate(golden["prompt"], cache=dict(names=[name, weights], steps=[0, 3]), max_cache_bytes=None, **run)
    assert torch.equal(out.sequences, golden["output"])
    for step in (0, 3):
        routed = int((out.cache[step][weights][..., 0] != 0).sum())
        assert out.cache[step][name].shape == (routed, model.cfg.d_expert_mlp)
    with pytest.raises(ValueError, match="cached only whole"):
        model.generate(golden["prompt"], cache=dict(names=[name], steps=[0], positions="response"),
                       max_cache_bytes=None, **run)
