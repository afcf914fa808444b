"""Issue 5, step-aware steering: identities through `model.generate` (orthogonalized weights == runtime
ablation at every step, step-scheduled hooks, replays, masked KL, mean_difference at a later step,
sensitivity grids, patching across steps)."""

import copy
import warnings

import pytest
import torch

from diffusion_lens.evals import masked_kl
from diffusion_lens.steering import (
    AffineMap,
    ablate,
    fold,
    mean_difference,
    orthogonalize_weights,
    patch_across_steps,
    sensitivity,
)
from diffusion_lens.denoising import with_prompt
from tests.test_steering_core import load, one_thread, random_unit  # noqa: F401  (autouse fixture)

OPTS = dict(steps=8, gen_length=8, block_length=4)


def prompts(n=2, length=6, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llada-tiny-mha", "llada-tiny-gqa"])
def test_orthogonalized_weights_give_the_same_tokens_at_every_step(name):
    model = load(name)
    r = random_unit(64, 21)
    tokens = prompts()
    runtime = model.generate(tokens, hooks=ablate(model, r), progress=False, **OPTS)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r)
    permanent = edited.generate(tokens, progress=False, **OPTS)
    assert torch.equal(runtime.trajectory, permanent.trajectory)
    plain = model.generate(tokens, progress=False, **OPTS)
    assert not torch.equal(plain.trajectory, runtime.trajectory)  # the ablation does change the run


def test_folded_map_generates_like_runtime_map():
    model = load("llada-tiny-mha")
    g = torch.Generator().manual_seed(5)
    site = "blocks.1.hook_mlp_out"
    amap = AffineMap({site: torch.full((64,), 1.5, dtype=torch.float64)}, {site: 0.5 * torch.randn(64, generator=g, dtype=torch.float64)})
    tokens = prompts()
    runtime = model.generate(tokens, hooks=amap.as_hooks(0.8), progress=False, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # folded biases are saveable now (sidecar), so nothing to warn about
        fold(model, amap, strength=0.8)
    assert torch.equal(model.generate(tokens, progress=False, **OPTS).trajectory, runtime.trajectory)


def test_step_scheduled_ablation_acts_only_at_its_steps():
    model = load("llada-tiny-mha")
    r = random_unit(64, 3)
    seen = {}

    def record(act, hook):
        seen[hook.state.step] = float((act.double() @ r.double()).abs().max())

    hooks = ablate(model, r, steps=[2, 5], positions="response") + [("blocks.1.hook_resid_pre", record)]
    model.generate(prompts(), hooks=hooks, progress=False, **OPTS)
    # at steps 2 and 5 the response positions lose the component; the prompt keeps it
    assert seen[2] > 1e-3 and seen[0] > 1e-3

    def record_response(act, hook):
        start = hook.state.response_start
        seen[hook.state.step] = float((act[:, start:].double() @ r.double()).abs().max())

    hooks = ablate(model, r, steps=[2, 5], positions="response") + [("blocks.1.hook_resid_pre", record_response)]
    model.generate(prompts(), hooks=hooks, progress=False, **OPTS)
    assert seen[2] <= 1e-5 and seen[5] <= 1e-5 and seen[0] > 1e-3 and seen[3] > 1e-3


def test_replay_is_teacher_forced_and_identical_without_hooks():
    model = load("llada-tiny-gqa")
    run = model.generate(prompts(), record=True, capture_logits=range(8), progress=False, **OPTS)
    assert len(run.states) == 8 and run.trajectory.shape == (8, 2, 14)
    again = model.generate(prompts(), replay=run, capture_logits=range(8), progress=False)
    for step in range(8):
        torch.testing.assert_close(again.logits[step], run.logits[step], atol=0, rtol=0)
    steered = model.generate(prompts(), replay=run, hooks=ablate(model, random_unit(64, 1)), capture_logits=[3],
                             stop_after=3, progress=False)
    assert set(steered.logits) == {3} and not torch.allclose(steered.logits[3], run.logits[3])
    swapped = with_prompt(run.states, prompts(seed=9))
    assert torch.equal(swapped[4].canvas[:, 6:], run.states[4].canvas[:, 6:])
    assert torch.equal(swapped[4].canvas[:, :6], prompts(seed=9))


def test_masked_kl_zero_without_steering_and_matches_manual_kl():
    model = load("llada-tiny-mha")
    tokens = prompts(3)
    none = masked_kl(model, tokens, [], steps=[0, 3, 7], generate_kwargs=OPTS, batch_size=2)
    assert none.steps == [0, 3, 7] and torch.all(none.per_step == 0) and none.mean == 0.0
    r = random_unit(64, 2)
    res = masked_kl(model, tokens, ablate(model, r), steps=[0, 5], generate_kwargs=OPTS)
    run = model.generate(tokens, record=True, capture_logits=[5], progress=False, **OPTS)
    steered = model.generate(tokens, replay=run, hooks=ablate(model, r), capture_logits=[5], progress=False)
    state = run.states[5]
    where = state.is_masked & state.is_response
    p = torch.log_softmax(run.logits[5][where].double(), -1)
    q = torch.log_softmax(steered.logits[5][where].double(), -1)
    manual = (p.exp() * (p - q)).sum(-1).mean()
    assert res.n_positions.tolist() == [3 * 8, int(where.sum())]
    torch.testing.assert_close(res.per_step[1], manual)
    assert res.per_step[0] > 0


def test_mean_difference_at_a_later_step_reads_that_steps_canvas():
    model = load("llada-tiny-mha")
    pos, neg = prompts(3, seed=1), prompts(3, seed=2)
    dirs = mean_difference(model, pos, neg, layers=[1], positions=["last_prompt", "response[0]", "response[3]"], step=4,
                           generate_kwargs=dict(OPTS, seed=0))
    expected = []
    for tokens in (pos, neg):
        _, cache = model.run_with_cache(tokens, step=4, names_filter=["blocks.1.hook_resid_pre"], seed=0, **OPTS)
        act = cache["blocks.1.hook_resid_pre"]
        expected.append(act[:, [5, 6, 9]].double().mean(0))
    torch.testing.assert_close(dirs.mean_positive[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dirs.directions[0], expected[0] - expected[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="step=9"):
        mean_difference(model, pos, neg, layers=[1], positions="last_prompt", step=9, generate_kwargs=OPTS)


def test_sensitivity_grid_shapes_and_identities():
    model = load("llada-tiny-mha")
    r = random_unit(64, 4)
    tokens = prompts(2)
    plain = model.generate(tokens, progress=False, seed=0, **OPTS).responses

    def changed(out):  # fraction of response tokens that differ from the unsteered run
        return (out.responses != plain).double().mean(1)

    sens = sensitivity(model, r, tokens, over=("layers", "steps"), window=4, metric=changed, generate_kwargs=dict(OPTS, seed=0))
    assert sens.values.shape == (3, 2) and sens.col_labels == ["0-3", "4-7"] and sens.row_labels == ["0", "1", "2"]
    assert sens.baseline == 0.0 and sens.full > 0
    full = model.generate(tokens, hooks=ablate(model, r), progress=False, seed=0, **OPTS).responses
    assert sens.full == float((full != plain).double().mean())
    blocks = sensitivity(model, r, tokens, over="blocks", metric=changed, generate_kwargs=dict(OPTS, seed=0))
    assert blocks.values.shape == (1, 2) and blocks.col_labels == ["0", "1"]
    # ablating only in block 1 cannot change block 0's tokens, which are final before block 1 starts
    only_late = model.generate(tokens, hooks=ablate(model, r, denoise_blocks=[1]), progress=False, seed=0, **OPTS).responses
    assert torch.equal(only_late[:, :4], plain[:, :4])
    with pytest.raises(ValueError, match="over must be"):
        sensitivity(model, r, tokens, over="heads", metric=changed, generate_kwargs=OPTS)
    with pytest.raises(ValueError, match="no tokenizer"):
        sensitivity(model, r, tokens, over="layers", generate_kwargs=OPTS)


@pytest.mark.parametrize("mode", ["generate", "teacher_forced"])
def test_patching_every_clean_activation_reproduces_the_clean_run(mode):
    model = load("llada-tiny-gqa")
    clean, corrupt = prompts(2, seed=3), prompts(2, seed=4)
    opts = dict(OPTS, temperature=0.7, seed=11)  # sampled: the same seed must give the same draws
    clean_out = model.generate(clean, progress=False, **opts)

    if mode == "generate":
        def metric(out):
            return (out.responses == clean_out.responses).double().mean()
    else:
        clean_logits = model.generate(clean, capture_logits=range(8), progress=False, **opts).logits

        def metric(logits):
            return -max(float((logits[s] - clean_logits[s]).abs().max()) for s in clean_logits)

    res = patch_across_steps(model, clean, corrupt, names=["hook_embed", "blocks.1.hook_resid_pre"],
                             steps=[range(8), [0], [6, 7]], positions=[None, "response"], metric=metric,
                             mode=mode, generate_kwargs=opts)
    assert res.effects.shape == (2, 3, 2) and res.steps == ["0-7", 0, "6-7"] and res.positions == ["all", "response"]
    if mode == "generate":
        assert res.clean == 1.0 and res.corrupted < 1.0
    else:
        assert res.clean == 0.0 and res.corrupted < 0.0
    # all steps, all positions of a hook point that carries the whole input: exactly the clean run
    assert res.effects[0, 0, 0] == res.clean - res.corrupted
    assert res.effects[1, 0, 0] == res.clean - res.corrupted


def test_patching_argument_errors():
    model = load("llada-tiny-gqa")
    with pytest.raises(ValueError, match="different token lengths"):
        patch_across_steps(model, prompts(2, 6), prompts(2, 5), names=["hook_embed"], metric=lambda o: 0.0, generate_kwargs=OPTS)
    with pytest.raises(ValueError, match="outside 0..7"):
        patch_across_steps(model, prompts(), prompts(seed=3), names=["hook_embed"], steps=[9], metric=lambda o: 0.0,
                           generate_kwargs=OPTS)
    with pytest.raises(KeyError, match="Unknown hook point"):
        patch_across_steps(model, prompts(), prompts(seed=3), names=["blocks.7.hook_resid_pre"], metric=lambda o: 0.0,
                           generate_kwargs=OPTS)
    with pytest.raises(ValueError, match="mode"):
        patch_across_steps(model, prompts(), prompts(seed=3), names=["hook_embed"], metric=lambda o: 0.0, mode="x")
