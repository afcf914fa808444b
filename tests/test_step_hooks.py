"""Issue 3: step-scheduled hooks (`diffusion_lens.denoising.hooks.at`) and the `DenoisingState` they see:
steps, denoising blocks, position scopes per row of a padded batch, attention maps, guidance rows, plain forwards."""

import pytest
import torch

from diffusion_lens import hooks as H
from tests._denoising import golden_run, load_model, mask_entering

NAME = "llada-tiny-mha"
RESID = "blocks.0.hook_resid_post"


def padded():
    model, golden = load_model(NAME), golden_run(NAME, "gen_padded")
    kwargs = dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    return model, golden, kwargs


def test_hook_fires_exactly_at_scheduled_steps_with_matching_state():
    model, golden, kwargs = padded()
    seen = {}

    def record(act, hook):
        seen[hook.state.step] = hook.state

    out = model.generate(golden["prompt"], hooks=[H.at(RESID, record, steps={2, 3})], **kwargs)
    assert torch.equal(out.sequences, golden["output"])  # a read-only hook changes nothing
    assert sorted(seen) == [2, 3]
    for step, state in seen.items():
        assert torch.equal(state.is_masked, mask_entering(golden, step))
        assert torch.equal(state.canvas, golden["trajectory"][step - 1])
        assert state.n_steps == 8 and state.block == 0 and state.step_in_block == step
        assert torch.equal(state.newly_unmasked, mask_entering(golden, step - 1) & ~mask_entering(golden, step))
        assert state.response_start == 6 and not state.guidance
        pads = torch.cat([golden["attention_mask"].eq(0), torch.zeros(2, 16, dtype=torch.bool)], 1)
        assert torch.equal(state.is_pad, pads) and pads.any()
        assert state.prompt_len.tolist() == golden["attention_mask"].sum(1).tolist()
        response_masked = mask_entering(golden, step)[:, 6:]
        assert state.mask_ratio == pytest.approx(response_masked.float().mean().item())


@pytest.mark.parametrize("spec, expected", [
    (range(1, 3), [1, 2]), ([0, 7], [0, 7]), (5, [5]), (lambda s: s.step_in_block == 0, [0, 4]),
])
def test_step_specs(spec, expected):
    model, golden, kwargs = padded()
    fired = []
    model.generate(golden["prompt"], hooks=[H.at("hook_embed", lambda a, hook: fired.append(hook.state.step), steps=spec)],
                   **kwargs)
    assert fired == expected


def test_denoise_block_filter_and_glob_names():
    model, golden, kwargs = padded()
    fired = []
    hook = H.at("blocks.*.hook_resid_pre", lambda a, hook: fired.append((hook.state.step, hook.name)), denoise_blocks=1)
    model.generate(golden["prompt"], hooks=[hook], **kwargs)
    assert [s for s, _ in fired] == [s for s in range(4, 8) for _ in range(3)]
    assert {n for _, n in fired} == {f"blocks.{l}.hook_resid_pre" for l in range(3)}


def scoped_difference(model, golden, kwargs, positions, name="blocks.0.hook_resid_pre", step=3, **at_kwargs):
    """[rows pos] bool: where a large additive hook at `step` changed `name` (cached after the hook)."""
    cache_spec = dict(names=[name], steps=[step])
    base = model.generate(golden["prompt"], cache=cache_spec, **kwargs).cache[step][name]
    bump = H.at(name, lambda act, hook: act + 100.0, steps=step, positions=positions, **at_kwargs)
    hooked = model.generate(golden["prompt"], hooks=[bump], cache=cache_spec, **kwargs).cache[step][name]
    return (hooked - base).abs().flatten(2).amax(-1) > 0


def expected_scopes(golden, step=3):
    pads = torch.cat([golden["attention_mask"].eq(0), torch.zeros(2, 16, dtype=torch.bool)], 1)
    response = torch.zeros(2, 22, dtype=torch.bool)
    response[:, 6:] = True
    masked = mask_entering(golden, step)
    return {
        "prompt": ~response & ~pads,
        "response": response,
        "masked": masked,
        "unmasked": ~masked & ~pads,
        "newly_unmasked": mask_entering(golden, step - 1) & ~masked,
    }


@pytest.mark.parametrize("scope", ["prompt", "response", "masked", "unmasked", "newly_unmasked"])
def test_named_scope_touches_only_its_positions_in_every_row(scope):
    model, golden, kwargs = padded()
    changed = scoped_difference(model, golden, kwargs, scope)
    expected = expected_scopes(golden)[scope]
    assert expected.any() and not expected.all()
    assert torch.equal(changed, expected)


def test_index_bool_and_callable_scopes():
    model, golden, kwargs = padded()
    index = torch.tensor([0, 7, -1])
    expected = torch.zeros(2, 22, dtype=torch.bool)
    expected[:, [0, 7, 21]] = True
    assert torch.equal(scoped_difference(model, golden, kwargs, index), expected)
    assert torch.equal(scoped_difference(model, golden, kwargs, [0, 7, 21]), expected)
    per_row = torch.zeros(2, 22, dtype=torch.bool)
    per_row[0, 3], per_row[1, 10] = True, True
    assert torch.equal(scoped_difference(model, golden, kwargs, per_row), per_row)
    masked_response = lambda state: state.is_masked & state.is_response  # noqa: E731
    assert torch.equal(scoped_difference(model, golden, kwargs, masked_response), expected_scopes(golden)["masked"])


def test_in_place_hook_function_is_scoped_too():
    model, golden, kwargs = padded()

    def in_place(act, hook):
        act.add_(100.0)

    cache_spec = dict(names=[RESID], steps=[3])
    base = model.generate(golden["prompt"], cache=cache_spec, **kwargs).cache[3][RESID]
    out = model.generate(golden["prompt"], hooks=[H.at(RESID, in_place, steps=3, positions="masked")],
                         cache=cache_spec, **kwargs)
    changed = (out.cache[3][RESID] - base).abs().amax(-1) > 0
    assert torch.equal(changed, expected_scopes(golden)["masked"])


def test_attention_pattern_scoped_on_query_positions():
    model, golden, kwargs = padded()
    name = "blocks.1.attn.hook_pattern"
    cache_spec = dict(names=[name], steps=[3])
    base = model.generate(golden["prompt"], cache=cache_spec, **kwargs).cache[3][name]
    hooked = model.generate(golden["prompt"], cache=cache_spec, hooks=[
        H.at(name, lambda p, hook: torch.zeros_like(p), steps=3, positions="response")], **kwargs).cache[3][name]
    changed_queries = (hooked - base).abs().amax(dim=(1, 3)) > 0  # [batch q_pos]
    assert torch.equal(changed_queries, expected_scopes(golden)["response"])
    assert torch.equal(hooked[:, :, :6], base[:, :, :6])


def test_guidance_state_rows_and_guidance_filter():
    model, golden = load_model(NAME), golden_run(NAME, "gen_cfg")
    kwargs = dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    rows = []
    out = model.generate(golden["prompt"], hooks=[
        H.at(RESID, lambda a, hook: rows.append((a.shape[0], hook.state.guidance, hook.state.n_copies)), steps=0)], **kwargs)
    assert torch.equal(out.sequences, golden["output"])
    assert rows == [(4, True, 2)]
    spec = dict(names=[RESID], steps=[2], include_unconditional=True)
    base = model.generate(golden["prompt"], cache=spec, **kwargs).cache[2][RESID]
    assert base.shape[0] == 4
    for guidance_rows, touched_rows in [("conditional", [0, 1]), ("unconditional", [2, 3]), ("both", [0, 1, 2, 3])]:
        hook = H.at(RESID, lambda a, hook: a + 1.0, steps=2, positions="response", guidance=guidance_rows)
        hooked = model.generate(golden["prompt"], hooks=[hook], cache=spec, **kwargs).cache[2][RESID]
        changed = (hooked - base).abs().amax(-1) > 0  # [4 pos]
        expected = torch.zeros(4, 22, dtype=torch.bool)
        expected[touched_rows, 6:] = True
        assert torch.equal(changed, expected), guidance_rows


def test_plain_forward_semantics():
    model, golden = load_model(NAME), golden_run(NAME, "gen_semi_ar")
    canvas = golden["trajectory"][2]
    base = model(canvas)
    fired = []
    logits = model.run_with_hooks(canvas, fwd_hooks=[H.at(RESID, lambda a, hook: fired.append(1), steps=[5])])
    assert fired == [1] and torch.equal(logits, base)  # no state: the step filter does not apply
    with pytest.raises(ValueError, match="needs a DenoisingState"):
        model.run_with_hooks(canvas, fwd_hooks=[H.at(RESID, lambda a, hook: a, positions="response")])
    _, before = model.run_with_cache(canvas, names_filter=[RESID])
    with model.hooks(fwd_hooks=[H.at("hook_embed", lambda a, hook: a * 0, positions=[1, 2])]):
        _, after = model.run_with_cache(canvas, names_filter=[RESID])
    changed = (after[RESID] - before[RESID]).abs().amax(-1) > 0
    assert changed.any(dim=0).tolist() == [True] * 22  # bidirectional attention spreads the change
    with pytest.raises(ValueError, match="Unknown position scope"):
        H.at(RESID, lambda a, hook: a, positions="responses")


def test_position_mask_helper():
    model, golden, kwargs = padded()
    masks = []

    def fn(act, hook):
        masks.append(H.position_mask(hook.state, "masked"))
        masks.append(H.position_mask(hook.state, [0]))

    model.generate(golden["prompt"], hooks=[H.at(RESID, fn, steps=4)], **kwargs)
    assert torch.equal(masks[0], mask_entering(golden, 4))
    assert masks[1].shape == (2, 22) and masks[1][:, 0].all() and masks[1].sum() == 2
