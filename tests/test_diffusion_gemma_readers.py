"""Issue 13 (items 2 and 5): reading activations per pass on DiffusionGemma, whose every forward is a
windowed forward of one of two passes and whose run stops adaptively.

Readers (`collect_activations`, `mean_difference`, `fit_transport`): "encoder" readings equal a plain
encoder forward of the prompt, "decoder" readings equal a hook at generate's first decoder step on the
same seeded noise canvas, left-padded batches read what single prompts read, and positions a pass
does not compute are errors. Observers (`generate(cache=)`, `reducers=`): each step keeps the
requested columns its forward computed, `passes=` selects forwards, steps that never ran are absent.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.denoising import CanvasProbe, StepCache, StreamingMean
from diffusion_lens.steering import collect_activations, fit_transport, mean_difference
from tests.conftest import FIXTURES

SITES = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_pre"]
PROMPTS = [torch.tensor([2, 65, 149, 131]), torch.tensor([2, 7, 8, 9, 10, 11]), torch.tensor([2, 17, 18])]
OTHERS = [torch.tensor([2, 5, 149, 31, 40]), torch.tensor([2, 9, 9, 9])]
RUN = dict(chat=False, progress=False, max_new_tokens=32, max_denoising_steps=4)


@pytest.fixture(scope="module")
def gemma():
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny")


def hook_readings(model, prompt, seed, **run):
    """{step: (pass, window, {site: act [1 window d]})} of every forward of `generate(prompt, seed=seed)`."""
    seen = {}

    def read(act, hook):
        state = hook.state
        seen.setdefault(state.step, (state.pass_name, state.window, {}))[2][hook.name] = act.clone()

    out = model.generate(prompt[None], seed=seed, hooks=[(site, read) for site in SITES], **{**RUN, **run})
    return seen, out


# ------------------------------------------------------------------------------------------- readers
def test_encoder_readings_equal_a_plain_encoder_forward_of_the_prompt(gemma):
    every = collect_activations(gemma, PROMPTS, sites=SITES, pooling=None, pass_name="encoder")
    last = collect_activations(gemma, PROMPTS, sites=SITES, pooling=["last_prompt", "prompt[-2]"], pass_name="encoder")
    default = collect_activations(gemma, PROMPTS, sites=SITES, pooling="last_prompt")  # None: step 0, the encoder
    start = 0
    for i, prompt in enumerate(PROMPTS):
        _, plain = gemma.run_with_cache(prompt[None], pass_name="encoder", names_filter=SITES)
        seen, _ = hook_readings(gemma, prompt, seed=0, stop_after=0)
        assert seen[0][:2] == ("encoder", (0, len(prompt)))  # the sampler's step 0 is this forward
        for site in SITES:
            ref = plain[site][0].double()
            torch.testing.assert_close(seen[0][2][site][0].double(), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(every[site][start:start + len(prompt)], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last[site][i], ref[[-1, -2]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(default[site][i, 0], ref[-1], atol=1e-5, rtol=1e-5)
        start += len(prompt)
    assert all(every[site].shape[0] == sum(map(len, PROMPTS)) for site in SITES)  # prompt columns only


def test_decoder_readings_equal_generates_first_decoder_step_on_the_seeded_canvas(gemma):
    for seed in (0, 5):
        acts = collect_activations(gemma, PROMPTS[:1], sites=SITES, pooling=["response[0]", "response[15]"],
                                   pass_name="decoder", seed=seed)
        pooled = collect_activations(gemma, PROMPTS[:1], sites=SITES, pooling="mean_response", pass_name="decoder",
                                     seed=seed)
        seen, _ = hook_readings(gemma, PROMPTS[0], seed=seed, stop_after=1)
        pass_name, window, read = seen[1]
        assert pass_name == "decoder" and window == (4, 20)
        for site in SITES:
            torch.testing.assert_close(acts[site][0], read[site][0, [0, 15]].double(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pooled[site][0], read[site][0].double().mean(0), atol=1e-5, rtol=1e-5)
    other = collect_activations(gemma, PROMPTS[:1], sites=SITES, pooling="mean_response", pass_name="decoder", seed=1)
    assert not torch.allclose(other[SITES[0]], pooled[SITES[0]])  # the canvas is the seed's


@pytest.mark.parametrize("pass_name,pooling", [("encoder", ["last_prompt", "prompt[-3]"]), ("encoder", "mean_prompt"),
                                               ("encoder", None), ("decoder", ["response[0]", "response[9]"]),
                                               ("decoder", "mean_response"), ("decoder", None)])
def test_left_padded_batches_read_what_single_prompts_read(gemma, pass_name, pooling):
    batched = collect_activations(gemma, PROMPTS, sites=SITES, pooling=pooling, pass_name=pass_name, batch_size=3)
    single = [collect_activations(gemma, [p], sites=SITES, pooling=pooling, pass_name=pass_name) for p in PROMPTS]
    for site in SITES:
        alone = torch.cat([s[site] for s in single])
        assert batched[site].shape == alone.shape
        torch.testing.assert_close(batched[site], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pass_name,pooling,match", [
    ("encoder", "response[0]", r"step 0 \(the 'encoder' pass\) computes columns \[0, 6\) \(the prompt"),
    ("encoder", "mean_all", "does not compute"),
    ("decoder", "last_prompt", r"step 1 \(the 'decoder' pass\) computes columns \[6, 22\) \(the response"),
    ("decoder", "mean_prompt", "does not compute"),
    ("decoder", "response[20]", r"computes columns \[6, 22\)"),  # block 1's columns: a later decoder forward
    ("middle", "last_prompt", r"runs the passes \('encoder', 'decoder'\)"),
])
def test_positions_a_pass_does_not_compute_are_errors(gemma, pass_name, pooling, match):
    with pytest.raises(ValueError, match=match):
        collect_activations(gemma, PROMPTS, sites=SITES, pooling=pooling, pass_name=pass_name, gen_length=32)
    with pytest.raises(ValueError, match=match):
        mean_difference(gemma, PROMPTS, OTHERS, layers=[1], positions=pooling or "last_prompt", pass_name=pass_name,
                        gen_length=32, progress=False)


def test_one_pass_models_refuse_a_pass_and_a_noise_model_refuses_a_mask_canvas(gemma):
    llada = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")
    prompts = [torch.tensor([300, 118, 262, 143])]
    with pytest.raises(ValueError, match="runs one pass: leave pass_name=None"):
        collect_activations(llada, prompts, sites=["blocks.0.hook_resid_post"], pass_name="encoder", gen_length=4)
    with pytest.raises(ValueError, match="runs one pass"):
        mean_difference(llada, prompts, prompts, layers=[0], positions="last_prompt", pass_name="decoder",
                        gen_length=4, progress=False)
    with pytest.raises(ValueError, match="seed= draws the noise canvas"):
        collect_activations(llada, prompts, sites=["blocks.0.hook_resid_post"], seed=3, gen_length=4)
    # what collect_activations used to run here: a prompt + mask canvas, meaningless without a mask token
    with pytest.raises(ValueError, match="no mask token .* gen_length=0"):
        gemma.generate(PROMPTS[0][None], sampler=CanvasProbe(gen_length=8), chat=False, progress=False)
    _, plain = gemma.run_with_cache(PROMPTS[0][None], names_filter=SITES[0])
    seen = []
    gemma.generate(PROMPTS[0][None], sampler=CanvasProbe(gen_length=0), chat=False, progress=False,
                   hooks=[(SITES[0], lambda act, hook: seen.append(act.clone()))])
    torch.testing.assert_close(seen[0], plain[SITES[0]])


def test_mean_difference_per_pass_equals_the_collected_means(gemma):
    for pass_name, positions in (("encoder", ["last_prompt", "prompt[-2]"]), ("decoder", ["response[1]", "response[7]"]),
                                 ("decoder", "mean_response")):
        dirs = mean_difference(gemma, PROMPTS, OTHERS, layers=[1, 3], positions=positions, pass_name=pass_name,
                               generate_kwargs=dict(seed=2, max_new_tokens=16), batch_size=2, progress=False)
        assert dirs.pass_name == pass_name and dirs.step == 0
        sites = ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre"]
        pos = collect_activations(gemma, PROMPTS, sites=sites, pooling=positions, pass_name=pass_name, seed=2)
        neg = collect_activations(gemma, OTHERS, sites=sites, pooling=positions, pass_name=pass_name, seed=2)
        expected = torch.stack([pos[s].mean(0) - neg[s].mean(0) for s in sites]).reshape(dirs.directions.shape)
        torch.testing.assert_close(dirs.directions, expected, atol=1e-5, rtol=1e-5)


def test_a_later_step_must_run_the_pass_asked_for(gemma):
    kwargs = dict(max_new_tokens=16, max_denoising_steps=4, seed=1)
    seen, _ = hook_readings(gemma, PROMPTS[0], seed=1, stop_after=3, max_new_tokens=16)
    dirs = mean_difference(gemma, PROMPTS[:1], OTHERS[:1], layers=[1], positions="response[2]", step=3,
                           pass_name="decoder", generate_kwargs=kwargs, progress=False, site="hook_resid_post")
    alone = mean_difference(gemma, PROMPTS[:1], PROMPTS[:1], layers=[1], positions="response[2]", step=3,
                            generate_kwargs=kwargs, progress=False, site="hook_resid_post")
    torch.testing.assert_close(alone.mean_positive[0, 0], seen[3][2][SITES[0]][0, 2].double(), atol=1e-5, rtol=1e-5)
    assert dirs.step == 3 and torch.equal(dirs.mean_positive, alone.mean_positive)
    with pytest.raises(ValueError, match="Step 3 runs the 'decoder' pass, not pass_name='encoder'"):
        mean_difference(gemma, PROMPTS[:1], OTHERS[:1], layers=[1], positions="last_prompt", step=3,
                        pass_name="encoder", generate_kwargs=kwargs, progress=False)


def test_fit_transport_collects_in_a_pass(gemma):
    site = SITES[0]
    amap = fit_transport("mean", PROMPTS, OTHERS, model=gemma, sites=[site], pooling="mean_response",
                         pass_name="decoder", seed=4)
    src = collect_activations(gemma, PROMPTS, sites=[site], pooling="mean_response", pass_name="decoder", seed=4)[site]
    tgt = collect_activations(gemma, OTHERS, sites=[site], pooling="mean_response", pass_name="decoder", seed=4)[site]
    torch.testing.assert_close(amap.beta[site].double(), (tgt.mean(0) - src.mean(0)).cpu(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- observers
def test_generate_cache_keeps_each_passes_columns_and_equals_the_hook_readings(gemma):
    seen, _ = hook_readings(gemma, PROMPTS[1], seed=3)
    dec = gemma.generate(PROMPTS[1][None], seed=3, cache=dict(names=SITES, passes="decoder"), **RUN).cache
    enc = gemma.generate(PROMPTS[1][None], seed=3, cache=dict(names=SITES, passes="encoder"), **RUN).cache
    decoder_steps = [s for s, (p, _, _) in seen.items() if p == "decoder"]
    assert dec.steps == decoder_steps and enc.steps == [s for s in seen if s not in decoder_steps]
    assert enc.steps[0] == 0 and enc[0].positions.tolist() == list(range(6))  # the prompt's columns at step 0
    assert dec.n_steps is None  # adaptive: the run's length is not known in advance
    for cache in (dec, enc):
        for step in cache.steps:
            window = seen[step][1]
            assert cache[step].positions.tolist() == list(range(*window))
            for site in SITES:
                assert torch.equal(cache[step][site], seen[step][2][site])
    response = gemma.generate(PROMPTS[1][None], seed=3, cache=dict(names=SITES[0], positions="response", steps=[0, 1]),
                              **RUN).cache
    assert response.steps == [1]  # step 0 (the prompt's encoder forward) computes no response column
    with pytest.raises(ValueError, match="counts from the end"):
        gemma.generate(PROMPTS[1][None], cache=dict(names=SITES[0], steps=-1), **RUN)
    with pytest.raises(ValueError, match="never run"):
        gemma.generate(PROMPTS[1][None], cache=dict(names=SITES[0], passes="middle"), **RUN)
    with pytest.raises(ValueError, match="stored nothing"):
        gemma.generate(PROMPTS[1][None], cache=dict(names=SITES[0], positions="prompt", passes="decoder"), **RUN)
    bound = gemma.estimate_cache_bytes(PROMPTS[1][None], cache=dict(names=SITES, passes="decoder"), **RUN)
    assert bound >= dec.nbytes  # the guard estimates from the upper bound
    logits, acts = gemma.run_with_cache(PROMPTS[1][None], step=1, names_filter=SITES, seed=3, **RUN)
    assert torch.equal(acts[SITES[0]], seen[1][2][SITES[0]]) and acts.positions.tolist() == list(range(6, 22))


def test_a_saved_step_cache_keeps_each_steps_columns(gemma, tmp_path):
    cache = gemma.generate(PROMPTS[1][None], seed=3, cache=dict(names=SITES[0], positions="response"), **RUN).cache
    cache.save(tmp_path / "cache")
    loaded = StepCache.load(tmp_path / "cache", gemma)
    assert loaded.steps == cache.steps and len({tuple(loaded[s].positions.tolist()) for s in loaded.steps}) == 2
    for step in cache.steps:
        assert torch.equal(loaded[step].positions, cache[step].positions)
        assert torch.equal(loaded[step][SITES[0]], cache[step][SITES[0]])


def test_a_streaming_mean_over_decoder_steps_is_the_mean_of_their_readings(gemma):
    seen, _ = hook_readings(gemma, PROMPTS[1], seed=3)
    pooled = StreamingMean(SITES, positions="response", passes="decoder")
    columns = StreamingMean(SITES[0], positions=[6, 7, 30], per_position=True, passes="decoder", by_step=True)
    encoder = StreamingMean(SITES[0], positions="prompt", passes="encoder")
    gemma.generate(PROMPTS[1][None], seed=3, reducers=[pooled, columns, encoder], **RUN)
    decoder = {s: read for s, (p, _, read) in seen.items() if p == "decoder"}
    for site in SITES:
        readings = torch.cat([read[site][0] for read in decoder.values()]).double()
        torch.testing.assert_close(pooled.mean(site), readings.mean(0))
        assert pooled.count(site) == readings.shape[0]
    step = min(decoder)  # block 0's first decoder step: columns 6 and 7 computed, 30 (block 1) not
    assert columns.count(SITES[0], step).tolist() == [1, 1, 0]
    torch.testing.assert_close(columns.sum(SITES[0], step)[:2], decoder[step][SITES[0]][0, :2].double())
    torch.testing.assert_close(encoder.mean(SITES[0]), seen[0][2][SITES[0]][0].double().mean(0))
    with pytest.raises(ValueError, match="counts from the end"):
        gemma.generate(PROMPTS[1][None], reducers=[StreamingMean(SITES[0], steps=-1)], **RUN)
    with pytest.raises(ValueError, match="runs the passes"):
        gemma.generate(PROMPTS[1][None], reducers=[StreamingMean(SITES[0], passes="middle")], **RUN)
