"""LLaDA2.0 / LLaDA2.1 samplers (`LLaDA2Sampler`) against every `golden_generate` run of both fixtures
(tests/fixtures/README-llada2.md): trajectory (the canvas after every forward), final canvas, the
window each forward reads and upstream's return value, greedy and seeded; batched rows left-padded by
any amount equal their single-prompt runs forward for forward; the bounded editing loop; option errors; `hook.state`'s block structure.

`model.generate` (the adapter's sampler) replays all 40 runs; one run per feature also runs on
`tests/_llada2.ReferenceLLaDA2`, a plain-torch forward written from the reference, which pins the
loops independently of the library's model (as do the batch and state tests).
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.denoising.samplers import LLaDA2Sampler
from diffusion_lens.denoising.samplers.llada2 import threshold_commit, threshold_schedule
from tests._llada2 import FIXTURES, VARIANTS, ReferenceLLaDA2, golden_runs, sampler_options

RUNS = sorted(golden_runs(VARIANTS[0]))
CFG = type("Cfg", (), {"mask_token_id": None, "eos_token_id": None, "n_ctx": None})()  # the runs pass mask_id / eos_id


@pytest.fixture(scope="module", params=VARIANTS)
def fixture(request):
    return ReferenceLLaDA2(request.param), golden_runs(request.param)


def _run(reference, sampler, prompt, attention_mask=None):
    """(states, canvases after each forward [steps batch pos]) of `sampler` on the reference model."""
    pairs = list(sampler.run(CFG, prompt, attention_mask, reference.forward_fn(), None))
    return [s for s, _ in pairs], torch.stack([c for _, c in pairs])


def _upstream_output(golden, options) -> torch.Tensor:
    """The golden's generated part: upstream's LLaDA2.0 eos_early_stop return also holds the prompt."""
    output, width = golden["output"][0], golden["prompt"].shape[1]
    early = options["algorithm"] == "llada2.0" and options["eos_early_stop"]
    return output[width:] if early and (output == options["eos_id"]).any() else output


#: one run per feature on the reference forward (every run goes through `model.generate` below)
REFERENCE_RUNS = ["hf20_t0_default", "hf20_sampled", "hf20_greedy_eos_early", "hf20_greedy_prompt_mask",
                  "hf21_sampled", "hf21_greedy_s", "hf21_greedy_eos_early"]


@pytest.mark.parametrize("name", REFERENCE_RUNS)
def test_golden_runs_on_the_reference_forward(fixture, name):
    reference, runs = fixture
    golden = runs[name]
    options, seed = sampler_options(golden["kwargs"])
    sampler = LLaDA2Sampler(**options)
    if seed is not None:
        torch.manual_seed(seed)  # upstream drew from the global RNG
    states, trajectory = _run(reference, sampler, golden["prompt"])
    assert trajectory[:, 0].equal(golden["trajectory"])
    assert trajectory[-1].equal(golden["canvas"])
    assert [s.window[1] for s in states] == [s.model_input.shape[1] for s in states] == golden["window_end"].tolist()
    width = golden["prompt"].shape[1]
    (output,) = LLaDA2Sampler.upstream_outputs(trajectory[-1], width, options["gen_length"], options["eos_id"])
    assert output.equal(_upstream_output(golden, options))
    assert len(states) <= sampler.n_steps() and max(s.block for s in states) < sampler.n_blocks()


def _ragged_batch(base, lengths=(10, 7, 3)):
    """Prompts of `lengths` tokens (repeats of `base`), left-padded into one batch: pads 0 / 3 / 7, not whole
    blocks of 4 (llada2-tiny) or 5 (llada2-tiny-b). Returns (prompts, batch, attention mask)."""
    prompts = [base.repeat(2)[:n] for n in lengths]
    width = max(lengths)
    batch = torch.stack([torch.cat([p.new_full((width - len(p),), 7), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    return prompts, batch, mask


def _assert_rows_follow_single_runs(states, trajectory, prompts, width, bl, single_run):
    """Each row of a batched run equals its single run: the canvas after each forward the row takes part in
    (`state.block_start` >= 0), the block it denoises there, and the final canvas (columns past the row's own
    canvas stay masks)."""
    for row, prompt in enumerate(prompts):
        pads = width - len(prompt)
        single_states, single = single_run(prompt[None])
        taking_part = [i for i, s in enumerate(states) if int(s.block_start[row]) >= 0]
        n = single.shape[-1]
        assert trajectory[taking_part, row, pads : pads + n].equal(single[:, 0])
        assert [int(states[i].block_start[row]) - pads + bl for i in taking_part] == [s.window[1] for s in single_states]
        assert trajectory[-1, row, pads : pads + n].equal(single[-1, 0])
        assert (trajectory[-1, row, pads + n :] == states[0].mask_id).all()


@pytest.mark.parametrize("name", ["hf20_greedy_eos_block", "hf20_greedy_eos_early", "hf21_greedy_s",
                                  "hf21_greedy_eos_early"])
def test_batched_padded_rows_equal_their_single_runs(fixture, name):
    """Prompts of 10, 7 and 3 tokens in one left-padded batch (pads 0 / 3 / 7, not whole blocks): each row is
    cut into blocks from its first real token, so it follows its single-prompt run forward for forward.
    Greedy only: a seeded batch draws one multinomial over all rows per forward, so its rows cannot equal
    single runs (the seeded goldens are batch-size 1)."""
    reference, runs = fixture
    golden = runs[name]
    options, _ = sampler_options(golden["kwargs"])
    prompts, batch, mask = _ragged_batch(golden["prompt"][0])
    sampler = LLaDA2Sampler(**options)
    states, batched = _run(reference, sampler, batch, mask)
    assert all(s.attention_block_offsets.tolist() == [0, 3, 7] for s in states)
    _assert_rows_follow_single_runs(states, batched, prompts, batch.shape[1], options["block_length"],
                                    lambda prompt: _run(reference, sampler, prompt))
    assert _run(reference, sampler, golden["prompt"])[1][:, 0].equal(golden["trajectory"])  # the single runs' anchor


def _mask_proposing_forward(mask_id, vocab=16):
    """A stub model whose every position proposes the mask token (with certainty)."""

    def forward(state):
        logits = torch.zeros(*state.model_input.shape, vocab)
        logits[..., mask_id] = 50.0
        return logits

    return forward


@pytest.mark.parametrize("max_block_steps, forwards", [(None, 4 + 16), (3, 3)])
def test_editing_loop_is_bounded_and_warns(max_block_steps, forwards):
    """Upstream's LLaDA2.1 loop never ends when the mask token is proposed; here the block ends, with a warning."""
    sampler = LLaDA2Sampler(algorithm="llada2.1", gen_length=4, block_length=4, mask_id=15, eos_id=1,
                            max_block_steps=max_block_steps)
    prompt = torch.tensor([[2, 3, 4, 5]])
    with pytest.warns(RuntimeWarning, match="still holds masks after max_block_steps=.*retry forever"):
        pairs = list(sampler.run(CFG, prompt, None, _mask_proposing_forward(15), None))
    assert len(pairs) == forwards
    assert (pairs[-1][1][0, 4:] == 15).all()


def test_llada20_leaves_proposed_masks_without_looping():
    sampler = LLaDA2Sampler(gen_length=4, block_length=4, steps=4, mask_id=15, eos_id=1)
    pairs = list(sampler.run(CFG, torch.tensor([[2, 3, 4, 5]]), None, _mask_proposing_forward(15), None))
    assert len(pairs) == 4 and (pairs[-1][1][0, 4:] == 15).all()  # 4 steps, then the block is left


def test_bad_options_raise_with_what_to_do():
    with pytest.raises(ValueError, match=r"algorithm='llada2\.2' must be one of \('llada2\.0', 'llada2\.1'\)"):
        LLaDA2Sampler(algorithm="llada2.2")
    with pytest.raises(ValueError, match="steps=0 must be a positive int"):
        LLaDA2Sampler(steps=0)
    with pytest.raises(ValueError, match=r"top_p=1\.5 must be in \(0, 1\]"):
        LLaDA2Sampler(top_p=1.5)
    with pytest.raises(ValueError, match="max_post_steps=-1 must be an int >= 0"):
        LLaDA2Sampler(max_post_steps=-1)
    with pytest.raises(TypeError, match="LLaDA2Sampler has no option 'sampler'"):
        LLaDA2Sampler().with_options(sampler="llada2.1")
    with pytest.raises(ValueError, match="mask_id"):
        list(LLaDA2Sampler(gen_length=4, block_length=4).run(CFG, torch.tensor([[1]]), None, _mask_proposing_forward(0), None))
    assert LLaDA2Sampler().with_options(max_new_tokens=8).gen_length == 8
    small = type("Cfg", (), {"mask_token_id": 15, "eos_token_id": 1, "n_ctx": 12})()
    with pytest.raises(ValueError, match=r"canvas is 16 positions .* rounded up to whole blocks of 8\), more than .* n_ctx=12"):
        list(LLaDA2Sampler(gen_length=6, block_length=8).run(small, torch.tensor([[1, 2, 3, 4, 5, 6]]), None,
                                                            _mask_proposing_forward(15), None))


def test_defaults_and_greedy_rules():
    assert LLaDA2Sampler().commit_threshold() == 0.95 and LLaDA2Sampler(algorithm="llada2.1").commit_threshold() == 0.7
    assert not LLaDA2Sampler().stochastic()
    assert LLaDA2Sampler(greedy=False).stochastic()  # upstream LLaDA2.0: temperature 0 samples at temperature 1
    assert LLaDA2Sampler(top_k=5).stochastic()  # the hub's greedy PR: argmax only without top-k / top-p
    assert not LLaDA2Sampler(algorithm="llada2.1", top_k=5, greedy=False).stochastic()  # LLaDA2.1: always argmax at 0
    assert LLaDA2Sampler(steps=32, gen_length=64, minimal_topk=8).steps_per_block() == 8
    assert LLaDA2Sampler(gen_length=16, block_length=4).block_range(6) == range(1, 6)
    assert LLaDA2Sampler(gen_length=16, block_length=4).n_blocks() == 5  # a prompt ending mid-block adds one


def test_schedule_and_commit_rule():
    assert threshold_schedule(4, 4) == [1, 1, 1, 1]
    assert threshold_schedule(5, 4) == [2, 1, 1, 1]
    assert threshold_schedule(4, 8) == [1, 1, 1, 1, 0, 0, 0, 0]
    inf = float("-inf")
    assert threshold_commit(torch.tensor([0.95, 0.5, inf]), 1, 0.95).tolist() == [True, False, False]  # strict >
    assert threshold_commit(torch.tensor([0.96, 0.97, 0.2]), 1, 0.95).tolist() == [True, True, False]  # all above
    assert threshold_commit(torch.tensor([0.3, inf, inf]), 2, 0.95).tolist() == [True, False, False]  # k <= candidates
    assert threshold_commit(torch.tensor([0.3, 0.2]), 0, 0.95).tolist() == [False, False]  # a 0 quota commits nothing


def test_state_carries_the_block_structure(fixture):
    reference, runs = fixture
    golden = runs["hf21_greedy_s"]  # editing_threshold 0: edits happen
    options, _ = sampler_options(golden["kwargs"])
    states, trajectory = _run(reference, LLaDA2Sampler(**options), golden["prompt"])
    bl, width = options["block_length"], golden["prompt"].shape[1]
    first = width // bl
    assert [s.block for s in states] == sorted(s.block for s in states) and states[0].block == 0
    for s in states:
        assert s.attention_block_size == bl and s.window == (0, (first + s.block + 1) * bl) and not s.is_cached_forward
        assert s.is_masked.equal(s.canvas == options["mask_id"])
    n_edits = 0
    for before, s in zip(states, states[1:]):
        changed = (s.canvas != before.canvas) & (before.canvas != options["mask_id"])
        assert s.newly_edited.equal(changed)
        n_edits += int(changed.sum())
    assert n_edits > 0 and states[0].newly_edited is None
    llada20, _ = _run(reference, LLaDA2Sampler(**sampler_options(runs["hf20_greedy"]["kwargs"])[0]),
                      runs["hf20_greedy"]["prompt"])
    assert all(s.newly_edited is None for s in llada20)


# ---------------------------------------------------------------------------------------------------- the library model
@pytest.fixture(scope="module", params=VARIANTS)
def model_and_runs(request):
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / request.param), golden_runs(request.param)


def _generate(model, prompt, kwargs, **options):
    """`model.generate` with a recorded run's kwargs unchanged (the fixture's sampler name as `algorithm`),
    through the adapter's sampler."""
    sampler_kwargs, seed = sampler_options(kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(prompt, chat=False, progress=False, **sampler_kwargs, **options)  # the adapter's sampler


@pytest.mark.parametrize("name", RUNS)
def test_generate_replays_every_golden_run(model_and_runs, name):
    model, runs = model_and_runs
    assert isinstance(model.adapter.sampler(model.cfg), LLaDA2Sampler)
    golden = runs[name]
    options, _ = sampler_options(golden["kwargs"])
    out = _generate(model, golden["prompt"], golden["kwargs"], record=True)
    assert out.trajectory[:, 0].equal(golden["trajectory"]) and out.sequences.equal(golden["canvas"])
    assert [s.window[1] for s in out.states] == golden["window_end"].tolist()
    assert out.n_forwards == len(golden["trajectory"])
    (output,) = LLaDA2Sampler.upstream_outputs(out.sequences, out.response_start, options["gen_length"], options["eos_id"])
    assert output.equal(_upstream_output(golden, options))


@pytest.mark.parametrize("name", ["hf20_greedy_eos_block", "hf21_greedy_s"])
def test_generate_batched_padded_rows_equal_single_runs(model_and_runs, name):
    """Through `model.generate` (the core's per-row block-causal mask, `attention_block_offsets=`)."""
    model, runs = model_and_runs
    golden = runs[name]
    prompts, batch, mask = _ragged_batch(golden["prompt"][0])
    out = _generate(model, batch, golden["kwargs"], attention_mask=mask, record=True)

    def single_run(prompt):
        single = _generate(model, prompt, golden["kwargs"], record=True)
        return single.states, single.trajectory

    _assert_rows_follow_single_runs(out.states, out.trajectory, prompts, batch.shape[1],
                                    golden["kwargs"]["block_length"], single_run)
    assert _generate(model, golden["prompt"], golden["kwargs"]).sequences.equal(golden["canvas"])


def test_hooks_see_the_window_and_block_structure(model_and_runs):
    model, runs = model_and_runs
    golden = runs["hf21_greedy_s"]
    seen = []

    def fn(act, hook):
        s = hook.state
        seen.append((s.block, act.shape[1], s.window[1], s.attention_block_size, s.newly_edited is not None))

    name = "blocks.0.hook_resid_post"
    out = _generate(model, golden["prompt"], golden["kwargs"], hooks=[(name, fn)], cache=dict(names=[name]))
    assert out.sequences.equal(golden["canvas"])
    assert len(seen) == out.n_forwards and all(width == end for _, width, end, _, _ in seen)
    assert {bl for *_, bl, _ in seen} == {golden["kwargs"]["block_length"]} and any(e for *_, e in seen)
    n_pos = golden["prompt"].shape[1] + golden["kwargs"]["gen_length"]  # cache= keeps the prompt and gen_length columns
    assert [out.cache[s][name].shape[1] for s in range(out.n_forwards)] == [min(end, n_pos) for *_, end, _, _ in seen]
