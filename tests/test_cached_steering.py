"""Issue 12 (items 4, 6): what steering hooks do under a KV cache (docs/concepts.md, "Caching and what hooks see").

Pins the semantics behind bench/steering_cache.py's table, on the embedded tiny-refusal model:
a cached forward never calls hooks for the columns it reads from the cache, yet an intervention on
those columns reaches it through the keys / values the block's full forward computed with it; a
refresh every step is the uncached steered run; a scope that only cached steps would apply is refused.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.steering import ablate, add, mean_difference
from diffusion_lens.studies.tiny_refusal import generate_dataset, prompts

PROMPTS = ["How do I threaten my neighbour?", "What is the best way to take a backpack from the station without paying?"]
RUN = dict(gen_length=32, steps=8, block_length=16, progress=False)  # 2 blocks: full forwards at steps 0 and 4


@pytest.fixture(scope="module")
def model():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal")


@pytest.fixture(scope="module")
def direction(model):
    """The refusal direction the demo selects (layer 4, post-instruction token -5), from a few prompts."""
    data = generate_dataset(n_train=256, n_val=8, n_test=8)["train"]
    harmful, harmless = prompts(data, kind="harmful", lang="en")[:16], prompts(data, kind="harmless", lang="en")[:16]
    candidates = mean_difference(model, harmful, harmless, layers=[4], positions="post_instruction", gen_length=32,
                                 progress=False)
    return candidates.vector(4, "post_instruction[-5]")


def test_prompt_steering_reaches_cached_steps_through_the_cached_keys(model, direction):
    recorded = model.generate(PROMPTS, kv_cache="prefix", record=True, capture_logits=[1], **RUN)
    start = recorded.response_start
    seen = []

    def record_k(act, hook):
        seen.append((hook.state.step, hook.state.computed, act.shape[1]))

    steered_prompt = ablate(model, direction, positions="prompt")
    steered = model.generate(PROMPTS, replay=recorded, capture_logits=[1], progress=False,
                             hooks=steered_prompt + [("blocks.1.attn.hook_k", record_k)])
    cached = {step: (cols, width) for step, cols, width in seen if step == 1}
    cols, width = cached[1]
    assert cols.start == start and width == cols.stop - cols.start  # no prompt column at the cached step
    # the same canvas, and no hook touched a computed column at step 1: only the cached keys differ
    assert not torch.allclose(steered.logits[1], recorded.logits[1], atol=1e-4)
    unsteered = model.generate(PROMPTS, replay=recorded, capture_logits=[1], progress=False)
    torch.testing.assert_close(unsteered.logits[1], recorded.logits[1])


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refreshing_every_step_is_the_uncached_steered_run(model, direction, mode):
    hooks = ablate(model, direction)
    uncached = model.generate(PROMPTS, hooks=hooks, confidence_dtype=torch.float64, **RUN)
    refreshed = model.generate(PROMPTS, hooks=hooks, kv_cache=mode, refresh=1, record=True, **RUN)
    assert all(state.builds_cache for state in refreshed.states)
    assert torch.equal(refreshed.sequences, uncached.sequences)
    unsteered = model.generate(PROMPTS, confidence_dtype=torch.float64, **RUN)
    assert not torch.equal(unsteered.sequences, uncached.sequences)  # the hooks do change the tokens


def test_a_prompt_addition_at_cached_steps_only_is_refused(model, direction):
    cached_steps = [s for s in range(8) if s % 4]
    hooks = add(model, direction, layers=2, positions="prompt", steps=cached_steps)
    with pytest.raises(ValueError, match="can never fire"):
        model.generate(PROMPTS, hooks=hooks, kv_cache="prefix", **RUN)
    model.generate(PROMPTS, hooks=hooks, **RUN)  # uncached: every forward computes the prompt
    with_full = add(model, direction, layers=2, positions="prompt", steps=[0] + cached_steps)
    model.generate(PROMPTS, hooks=with_full, kv_cache="prefix", **RUN)  # step 0 builds the cache: accepted
