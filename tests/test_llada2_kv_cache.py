"""`LLaDA2Sampler(kv_cache="prefix")`: exact KV caching of committed blocks (reference §5). Under block-causal
attention a committed block's keys / values never change, so block k's first forward computes blocks k-1 and
k only and its later forwards block k only, the rest read from the cache: every `golden_generate` run of
both fixtures (recorded kwargs + kv_cache="prefix") gives the recorded tokens, per-step canvases included;
left-padded batched rows equal their single runs; hooks see the window's columns; a cached forward's logits
equal the uncached forward's.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.denoising.samplers import LLaDA2Sampler
from tests._llada2 import FIXTURES, VARIANTS, golden_runs, sampler_options
from tests.test_llada2_generate import _assert_rows_follow_single_runs, _ragged_batch

RUNS = sorted(golden_runs(VARIANTS[0]))


@pytest.fixture(scope="module", params=VARIANTS)
def model_and_runs(request):
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / request.param), golden_runs(request.param)


def _generate(model, prompt, kwargs, **options):
    """`model.generate` with a recorded run's kwargs unchanged, under the KV cache unless `kv_cache=` says."""
    sampler_kwargs, seed = sampler_options(kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    options.setdefault("kv_cache", "prefix")
    return model.generate(prompt, chat=False, progress=False, **sampler_kwargs, **options)


def _expected_window(state, bl):
    """A single run's window: (0, block end) at the run's first forward, (previous block start, block end) at a
    block's first forward, (block start, block end) after."""
    start = int(state.block_start[0])
    begin = 0 if state.step == 0 else start - (bl if state.step_in_block == 0 else 0)
    return begin, start + bl


@pytest.mark.parametrize("name", RUNS)
def test_cached_generate_replays_every_golden_run(model_and_runs, name):
    model, runs = model_and_runs
    golden, bl = runs[name], runs[name]["kwargs"]["block_length"]
    out = _generate(model, golden["prompt"], golden["kwargs"], record=True)
    assert out.trajectory[:, 0].equal(golden["trajectory"]) and out.sequences.equal(golden["canvas"])
    assert [s.window[1] for s in out.states] == golden["window_end"].tolist()
    assert [s.window for s in out.states] == [_expected_window(s, bl) for s in out.states]
    assert all(s.kv_cache == "prefix" and s.is_cached_forward for s in out.states)
    assert all(s.model_input.shape[1] == s.window[1] - s.window[0] for s in out.states)
    assert any(s.window[0] > 0 for s in out.states)  # the cache is read


@pytest.mark.parametrize("name", ["hf20_greedy_eos_block", "hf21_greedy_s"])
def test_cached_batched_padded_rows_equal_single_runs(model_and_runs, name):
    """Left pads 0 / 3 / 7: the window is the union over running rows, each row's cache stays exact."""
    model, runs = model_and_runs
    golden = runs[name]
    prompts, batch, mask = _ragged_batch(golden["prompt"][0])
    out = _generate(model, batch, golden["kwargs"], attention_mask=mask, record=True)
    assert any(s.window[0] > 0 for s in out.states)

    def single_run(prompt):
        single = _generate(model, prompt, golden["kwargs"], record=True, kv_cache=None)
        return single.states, single.trajectory

    _assert_rows_follow_single_runs(out.states, out.trajectory, prompts, batch.shape[1],
                                    golden["kwargs"]["block_length"], single_run)


def test_hooks_see_the_window_columns(model_and_runs):
    model, runs = model_and_runs
    golden = runs["hf21_greedy_s"]
    seen = []

    def fn(act, hook):
        seen.append((act.shape[1], hook.state.window, hook.state.computed))

    name = "blocks.0.hook_resid_post"
    out = _generate(model, golden["prompt"], golden["kwargs"], hooks=[(name, fn)])
    assert out.sequences.equal(golden["canvas"]) and len(seen) == out.n_forwards
    assert all(width == stop - begin and cols == slice(begin, stop) for width, (begin, stop), cols in seen)
    assert any(begin > 0 for _, (begin, _), _ in seen)


@pytest.mark.parametrize("name", ["hf20_greedy_eos_block", "hf21_greedy_s"])
def test_cached_logits_equal_uncached(model_and_runs, name):
    """Each cached forward's logits equal the uncached prefix forward's on the window's columns."""
    model, runs = model_and_runs
    golden = runs[name]
    steps = list(range(len(golden["trajectory"])))
    cached = _generate(model, golden["prompt"], golden["kwargs"], record=True, capture_logits=steps)
    plain = _generate(model, golden["prompt"], golden["kwargs"], kv_cache=None, capture_logits=steps)
    for step, state in enumerate(cached.states):
        begin, stop = state.window
        torch.testing.assert_close(cached.logits[step], plain.logits[step][:, begin:stop], atol=1e-5, rtol=1e-5)


def test_only_prefix_is_a_cache_mode():
    with pytest.raises(ValueError, match="kv_cache='dual' must be None or 'prefix'"):
        LLaDA2Sampler(kv_cache="dual")
