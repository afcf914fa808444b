"""Issue 11 (item 2): `generate` is the one door for per-step work (stop_after, capture_logits,
record, replay), its driver options are listed once (its signature), every sampler starts from
`build_canvas` and samplers need only the config."""

import inspect

import pytest
import torch

from diffusion_lens.denoising import (
    DRIVER_OPTIONS,
    CanvasProbe,
    DreamSampler,
    LLaDASampler,
    build_canvas,
    split_generate_kwargs,
    with_prompt,
)
from diffusion_lens.steering import ablate
from tests._denoising import load_model
from tests.test_steering_core import one_thread, random_unit  # noqa: F401  (autouse fixture)

OPTS = dict(steps=8, gen_length=8, block_length=4)


def prompts(n=2, length=6, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def test_stop_after_ends_the_run_after_that_steps_forward():
    model = load_model("llada-tiny-mha")
    full = model.generate(prompts(), progress=False, **OPTS)
    seen = []
    cut = model.generate(prompts(), stop_after=2, hooks=[("hook_embed", lambda act, hook: seen.append(hook.state.step))],
                         progress=False, **OPTS)
    assert seen == [0, 1, 2]
    assert torch.equal(cut.trajectory, full.trajectory[:3]) and torch.equal(cut.sequences, full.trajectory[2])
    for bad in (8, -1, 2.0, True):
        with pytest.raises(ValueError, match="stop_after"):
            model.generate(prompts(), stop_after=bad, progress=False, **OPTS)
    with pytest.raises(ValueError, match=r"capture_logits steps \[3\] are not run: this run has steps 0..2"):
        model.generate(prompts(), stop_after=2, capture_logits=[3], progress=False, **OPTS)


def test_capture_logits_are_the_raw_forward_at_those_steps():
    model = load_model("dream-tiny")
    tokens = prompts()
    opts = dict(steps=4, max_new_tokens=8)
    out = model.generate(tokens, capture_logits=[0, 3], progress=False, **opts)
    assert set(out.logits) == {0, 3}
    logits, _ = model.run_with_cache(tokens, step=3, names_filter=["hook_embed"], **opts)
    torch.testing.assert_close(out.logits[3], logits, atol=0, rtol=0)
    canvas, _ = build_canvas(tokens, None, 8, model.cfg.mask_token_id)
    torch.testing.assert_close(out.logits[0], model(canvas), atol=0, rtol=0)  # raw: before Dream's shift


@pytest.mark.parametrize("name, opts", [("llada-tiny-gqa", dict(OPTS, cfg_scale=1.5)),
                                        ("dream-tiny", dict(steps=4, max_new_tokens=8, alg="entropy"))])
def test_record_then_replay_reproduces_every_canvas_and_logit(name, opts):
    model = load_model(name)
    tokens = prompts()
    run = model.generate(tokens, record=True, capture_logits=range(4), progress=False, **opts)
    assert [s.step for s in run.states] == list(range(opts["steps"]))
    again = model.generate(tokens, replay=run, record=True, capture_logits=range(4), progress=False)
    assert torch.equal(again.trajectory, run.trajectory) and torch.equal(again.sequences, run.sequences)
    for before, after in zip(run.states, again.states):
        assert torch.equal(before.canvas, after.canvas) and torch.equal(before.model_input, after.model_input)
    for step in range(4):
        torch.testing.assert_close(again.logits[step], run.logits[step], atol=0, rtol=0)
    steered = model.generate(tokens, replay=run, hooks=ablate(model, random_unit(model.cfg.d_model, 1)),
                             capture_logits=[2], stop_after=2, progress=False)
    assert set(steered.logits) == {2} and not torch.allclose(steered.logits[2], run.logits[2])
    assert torch.equal(steered.trajectory, run.trajectory[:3])  # teacher forced: the recorded canvases


def test_replay_with_another_prompt_writes_it_into_every_canvas():
    model = load_model("llada-tiny-mha")
    run = model.generate(prompts(), record=True, progress=False, **OPTS)
    other = prompts(seed=9)
    swapped = model.generate(other, replay=run, record=True, capture_logits=[5], progress=False)
    expected = with_prompt(run.states, other)
    for got, want in zip(swapped.states, expected):
        assert torch.equal(got.canvas, want.canvas)
    assert torch.equal(swapped.sequences[:, :6], other) and torch.equal(swapped.sequences[:, 6:], run.sequences[:, 6:])
    torch.testing.assert_close(swapped.logits[5], model(expected[5].canvas), atol=0, rtol=0)


def test_replay_refuses_what_cannot_apply():
    model = load_model("llada-tiny-mha")
    plain = model.generate(prompts(), progress=False, **OPTS)
    with pytest.raises(ValueError, match="record=True"):
        model.generate(prompts(), replay=plain, progress=False)
    run = model.generate(prompts(), record=True, progress=False, **OPTS)
    with pytest.raises(ValueError, match=r"\['steps'\] cannot apply"):
        model.generate(prompts(), replay=run, steps=8, progress=False)
    with pytest.raises(ValueError, match="recorded shape"):
        model.generate(prompts(length=5), replay=run, progress=False)


def test_driver_options_are_listed_once_in_the_signature():
    model = load_model("llada-tiny-mha")
    params = inspect.signature(model.generate).parameters
    keyword_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert tuple(keyword_only) == DRIVER_OPTIONS
    assert {"stop_after", "capture_logits", "record", "replay", "hooks", "cache", "seed"} <= set(DRIVER_OPTIONS)
    assert params["sampler_options"].kind is inspect.Parameter.VAR_KEYWORD and "**kwargs" not in str(params)
    sampler, driver = split_generate_kwargs(model, dict(steps=8, gen_length=8, seed=3, stop_after=1, record=True))
    assert sampler.n_steps() == 8 and driver == dict(seed=3, stop_after=1, record=True)
    for call in (lambda: model.generate(prompts(), stepz=8, progress=False),
                 lambda: model.estimate_cache_bytes(prompts(), cache=dict(names="hook_embed"), stepz=8),
                 lambda: model.run_with_cache(prompts(), step=0, stepz=8)):
        with pytest.raises(TypeError, match=r"no option 'stepz'; its options are \[.*'steps'.*generate's own options "
                                            r"are \[.*'stop_after'.*'replay'"):
            call()


def test_estimate_cache_bytes_takes_generate_keywords():
    model = load_model("llada-tiny-mha")
    request = dict(names="blocks.*.hook_resid_post", steps=[0, 5], positions="response")
    kwargs = dict(OPTS, seed=1, hooks=[], progress=False)
    predicted = model.estimate_cache_bytes(prompts(), cache=request, **kwargs)
    assert predicted == model.generate(prompts(), cache=request, **kwargs).cache.nbytes
    with pytest.raises(ValueError, match="sets \\['stop_after'\\] itself"):
        model.run_with_cache(prompts(), step=0, stop_after=1, **OPTS)


def test_build_canvas_is_the_step_zero_canvas_of_every_sampler():
    tokens = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    canvas, full = build_canvas(tokens, mask, 4, 99)
    assert canvas.tolist() == [[0, 5, 6, 99, 99, 99, 99], [7, 8, 9, 99, 99, 99, 99]]
    assert full.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    assert build_canvas(tokens, torch.ones_like(tokens), 4, 99)[1] is None  # no row padded: no mask
    with pytest.raises(ValueError, match="response_length"):
        build_canvas(tokens, None, -1, 99)
    for name, sampler in [("llada-tiny-mha", LLaDASampler(steps=4, gen_length=4)),
                          ("dream-tiny", DreamSampler(steps=4, max_new_tokens=4)), ("llada-tiny-mha", CanvasProbe(gen_length=4))]:
        model = load_model(name)
        first = model.generate(tokens, attention_mask=mask, sampler=sampler, record=True, stop_after=0, progress=False)
        state = first.states[0]
        want_canvas, want_mask = build_canvas(tokens, mask, 4, model.cfg.mask_token_id)
        assert torch.equal(state.canvas, want_canvas) and torch.equal(state.attention_mask, want_mask)


def test_samplers_need_only_the_config():
    model = load_model("llada-tiny-mha")
    sampler = model.adapter.sampler(model.cfg).with_options(**OPTS)
    tokens = prompts()
    canvases = [c for _, c in sampler.run(model.cfg, tokens, None, lambda s: model(s.model_input),
                                          torch.Generator().manual_seed(0))]
    assert torch.equal(torch.stack(canvases), model.generate(tokens, progress=False, **OPTS).trajectory)


def test_steering_record_run_replay_and_canvas_probe_are_deprecated_wrappers():
    from diffusion_lens.steering import CanvasProbe as OldProbe, record_run, replay

    model = load_model("llada-tiny-mha")
    with pytest.warns(DeprecationWarning, match="record=True"):
        run = record_run(model, prompts(), capture_logits=[3], **OPTS)
    with pytest.warns(DeprecationWarning, match="replay=recorded"):
        again = replay(model, run, steps=[3])
    door = model.generate(prompts(), record=True, capture_logits=[3], progress=False, **OPTS)
    torch.testing.assert_close(again[3], door.logits[3], atol=0, rtol=0)
    torch.testing.assert_close(run.logits[3], door.logits[3], atol=0, rtol=0)
    with pytest.warns(DeprecationWarning, match="diffusion_lens.denoising.CanvasProbe"):
        OldProbe(gen_length=4)
