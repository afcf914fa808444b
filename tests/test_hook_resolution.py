"""Issue 10, items 2, 3 and 6 (generate side): interventions that match nothing fail before the
run, negative steps mean the same everywhere, hook lists compose, and the canvas must fit the
context. Each test counts the forwards that ran, so "before the run" is checked, not assumed."""

import pytest
import torch

from diffusion_lens import hooks as H
from diffusion_lens.denoising import StreamingMean
from diffusion_lens.steering import ablate, add
from tests._denoising import golden_run, load_model, no_hooks_left

NAME = "llada-tiny-mha"
RESID = "blocks.0.hook_resid_post"


def setup():
    """The semi-AR golden run: 8 steps in 2 blocks, prompt 6 + response 16 = 22 canvas positions."""
    model, golden = load_model(NAME), golden_run(NAME, "gen_semi_ar")
    return model, golden["prompt"], dict(progress=False, **golden["kwargs"])


class ForwardCounter:
    """A ("hook_embed", fn) pair that counts forwards; listed after the hook under test."""

    def __init__(self):
        self.n = 0

    def __call__(self, act, hook):
        self.n += 1

    @property
    def pair(self):
        return ("hook_embed", self)


# ------------------------------------------------------------------ item 2: names
def test_glob_typo_fails_before_the_first_forward_with_the_close_glob():
    model, prompt, kwargs = setup()
    counter = ForwardCounter()
    with pytest.raises(KeyError, match=r"No hook point matches the glob 'blocks\.\*\.hook_resid_pots' "
                                       r"\(did you mean 'blocks\.\*\.hook_resid_post'"):
        model.generate(prompt, hooks=[counter.pair, H.at("blocks.*.hook_resid_pots", lambda a, hook: a * 0)], **kwargs)
    assert counter.n == 0 and no_hooks_left(model)


def test_names_filters_accept_globs_and_refuse_empty_matches_in_plain_forwards():
    model, prompt, _ = setup()
    _, cache = model.run_with_cache(prompt, names_filter="blocks.*.hook_resid_post")
    assert sorted(cache.keys()) == [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    _, listed = model.run_with_cache(prompt, names_filter=["hook_embed", "blocks.1.attn.hook_*"])
    assert "hook_embed" in listed.keys() and "blocks.1.attn.hook_pattern" in listed.keys()
    with pytest.raises(KeyError, match="selects no hook point"):
        model.run_with_cache(prompt, names_filter=lambda name: name.endswith("hook_resid_pots"))
    with pytest.raises(KeyError, match="No hook point matches the glob"):
        model.run_with_hooks(prompt, fwd_hooks=[("blocks.*.hook_resid_pots", lambda a, hook: a * 0)])
    with pytest.raises(KeyError, match="selects no hook point"):
        model.run_with_hooks(prompt, fwd_hooks=[(lambda name: False, lambda a, hook: a * 0)])
    # a plain (name, fn) pair may use a glob, as H.at does
    zeroed = model.run_with_hooks(prompt, fwd_hooks=[("blocks.*.hook_resid_post", lambda a, hook: a * 0)])
    assert torch.equal(zeroed, model.run_with_hooks(prompt, fwd_hooks=[(RESID.replace("0", "2"), lambda a, hook: a * 0)]))
    assert no_hooks_left(model)


# ------------------------------------------------------------------ item 2: steps, denoising blocks, positions
@pytest.mark.parametrize("schedule, shown", [
    (dict(steps=8), "steps=8"),
    (dict(steps=[0, 9, -9]), r"steps \[-9, 9\]"),
    (dict(steps=range(4, 12)), r"steps=range\(4, 12\)"),
    (dict(steps=[]), "selects nothing"),
    (dict(denoise_blocks=2), "denoise_blocks=2"),
    (dict(positions=[0, 22]), "outside a canvas of 22 positions"),
    (dict(positions=torch.ones(21, dtype=torch.bool)), "does not fit a canvas"),
])
def test_schedule_outside_the_run_fails_before_the_first_forward(schedule, shown):
    model, prompt, kwargs = setup()
    counter = ForwardCounter()
    hook = H.at(RESID, lambda a, hook: a * 0, **schedule)
    with pytest.raises(ValueError, match=shown + r".*This run has steps 0\.\.7, denoising blocks 0\.\.1 and 22 canvas positions"):
        model.generate(prompt, hooks=[counter.pair, hook], **kwargs)
    assert counter.n == 0 and no_hooks_left(model)


def test_one_block_runs_say_so():
    model, prompt, _ = setup()
    with pytest.raises(ValueError, match=r"This run has steps 0\.\.3, 1 denoising block and 14 canvas positions"):
        model.generate(prompt, hooks=[H.at(RESID, lambda a, hook: a, denoise_blocks=1)], steps=4, gen_length=8, progress=False)


def test_steering_builders_are_checked_too():
    model, prompt, kwargs = setup()
    r = torch.ones(model.cfg.d_model)
    with pytest.raises(ValueError, match="steps=8"):
        model.generate(prompt, hooks=ablate(model, r, steps=8), **kwargs)


@pytest.mark.parametrize("schedule, fired", [
    (dict(steps=-1), [7]),
    (dict(steps=[-2, 0]), [0, 6]),
    (dict(steps=range(-3, 0)), [5, 6, 7]),
    (dict(denoise_blocks=-1), [4, 5, 6, 7]),
])
def test_negative_steps_and_denoising_blocks_count_from_the_end(schedule, fired):
    model, prompt, kwargs = setup()
    seen = []
    model.generate(prompt, hooks=H.at(RESID, lambda a, hook: seen.append(hook.state.step), **schedule), **kwargs)
    assert seen == fired


def test_negative_steps_mean_the_same_in_caches_step_caches_and_reducers():
    model, prompt, kwargs = setup()
    out = model.generate(prompt, cache=dict(names=[RESID], steps=[0, -1]), **kwargs)
    assert out.cache.steps == [0, 7] and out.cache.n_steps == 8
    assert torch.equal(out.cache[-1][RESID], out.cache[7][RESID]) and -1 in out.cache and -2 not in out.cache
    with pytest.raises(KeyError, match=r"Step -2 \(= step 6 of this 8-step run\) was not cached"):
        out.cache[-2]
    logits, cache = model.run_with_cache(prompt, step=-1, names_filter=[RESID], **kwargs)
    assert torch.equal(cache[RESID], out.cache[7][RESID])
    last, seventh = (StreamingMean(RESID, positions="response", steps=s) for s in (-1, 7))
    model.generate(prompt, reducers=[last, seventh], **kwargs)
    assert torch.equal(last.mean(RESID), seventh.mean(RESID))


def test_reducer_names_and_steps_are_checked_before_the_run():
    model, prompt, kwargs = setup()
    counter = ForwardCounter()
    with pytest.raises(KeyError, match="No hook point matches the glob 'blocks.*.hook_resid_pots'"):
        model.generate(prompt, hooks=[counter.pair], reducers=[StreamingMean("blocks.*.hook_resid_pots")], **kwargs)
    with pytest.raises(ValueError, match=r"Steps \[8\] are outside this run's steps 0\.\.7"):
        model.generate(prompt, hooks=[counter.pair], reducers=[StreamingMean(RESID, steps=8)], **kwargs)
    with pytest.raises(ValueError, match="selects no step"):
        model.generate(prompt, hooks=[counter.pair], cache=dict(names=[RESID], steps=[]), **kwargs)
    assert counter.n == 0


def test_plain_forward_ignores_step_filters_but_checks_indices():
    """Documented in diffusion_lens.denoising.hooks: no state, so steps / denoise_blocks do not apply; indices still must fit."""
    model, prompt, _ = setup()
    fired = []
    model.run_with_hooks(prompt, fwd_hooks=H.at(RESID, lambda a, hook: fired.append(1), steps=-1, denoise_blocks=3))
    assert fired == [1]
    with pytest.raises(IndexError, match="outside a canvas of 6 positions"):
        model.run_with_hooks(prompt, fwd_hooks=H.at(RESID, lambda a, hook: a, positions=[6]))


# ------------------------------------------------------------------ item 3: hook lists compose
def test_hook_lists_compose_in_generate_hooks_and_run_with_hooks():
    model, prompt, kwargs = setup()
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(model.cfg.d_model, generator=g), torch.randn(model.cfg.d_model, generator=g)
    late = H.at("blocks.2.hook_resid_post", lambda a, hook: a * 0.5, steps=range(4, 8))
    nested = [ablate(model, r), add(model, v, layers=1), late]
    flat = [*ablate(model, r), *add(model, v, layers=1), late]
    assert torch.equal(model.generate(prompt, hooks=nested, **kwargs).sequences,
                       model.generate(prompt, hooks=flat, **kwargs).sequences)
    assert torch.equal(model.run_with_hooks(prompt, fwd_hooks=[nested, [[("hook_embed", lambda a, hook: a)]]]),
                       model.run_with_hooks(prompt, fwd_hooks=flat))
    single = ("blocks.1.hook_resid_pre", lambda a, hook: a * 0)
    assert torch.equal(model.run_with_hooks(prompt, fwd_hooks=single), model.run_with_hooks(prompt, fwd_hooks=[single]))
    with model.hooks(fwd_hooks=(single, late)):
        inside = model(prompt)
    assert torch.equal(inside, model.run_with_hooks(prompt, fwd_hooks=[single, late]))
    assert no_hooks_left(model)


@pytest.mark.parametrize("hooks, message", [
    ([(RESID, lambda a, hook: a), 3], r"hooks\[1\] is 3 \(int\)"),
    ([[RESID]], r"hooks\[0\]\[0\] is 'blocks\.0\.hook_resid_post' \(str\)"),
])
def test_bad_hook_elements_are_named(hooks, message):
    model, prompt, kwargs = setup()
    with pytest.raises(TypeError, match=message + r"; hooks takes a \(name, fn\) pair"):
        model.generate(prompt, hooks=hooks, **kwargs)
    with pytest.raises(TypeError, match=message.replace("hooks", "fwd_hooks", 1)):
        model.run_with_hooks(prompt, fwd_hooks=hooks)
    with pytest.raises(TypeError, match=r"hooks\[0\] is \('blocks\.0\.hook_resid_post', 'oops'\) \(tuple\): "
                                        r"its hook function 'oops' \(str\) is not callable"):
        model.generate(prompt, hooks=[(RESID, "oops")], **kwargs)


# ------------------------------------------------------------------ item 6 (generate side)
def test_canvas_longer_than_the_context_fails_before_the_run():
    model, prompt, _ = setup()
    assert model.cfg.n_ctx == 64
    counter = ForwardCounter()
    with pytest.raises(ValueError, match=r"prompt \(6 positions, padded\) plus the response \(64\) is 70 positions, "
                                         r"more than this model's context n_ctx=64"):
        model.generate(prompt, hooks=[counter.pair], steps=8, gen_length=64, progress=False)
    assert counter.n == 0
    assert model.generate(prompt, steps=8, gen_length=56, progress=False).sequences.shape == (2, 62)


def test_empty_inputs_fail_with_a_sentence():
    model, _, kwargs = setup()
    with pytest.raises(ValueError, match="generate got an empty list of prompts"):
        model.generate([], **kwargs)
    with pytest.raises(ValueError, match=r"generate got token ids of shape \(0, 5\): no prompt to denoise"):
        model.generate(torch.zeros(0, 5, dtype=torch.long), **kwargs)
