"""Issue 16 (item 2): the diffusion KL against a recorded unmodified run (`kl_reference` / `KLReference.measure`),
the first-position proxy next to it, and the rank correlation between the two over trials."""

import copy
import math

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.evals import first_position_kl, kl_reference, masked_kl, rank_correlation
from diffusion_lens.steering import ablate, orthogonalize_weights
from tests.test_steering_core import load, one_thread, random_unit  # noqa: F401  (autouse fixture)

OPTS = dict(steps=8, gen_length=8, block_length=4)
PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def model():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal")


def manual_masked_kl(model, hooks, step):
    """masked_kl's former algorithm (its own unmodified run and steered replay, float64 KL), one batch."""
    run = model.generate(PROMPTS, record=True, capture_logits=[step], progress=False, **OPTS)
    steered = model.generate(PROMPTS, replay=run, hooks=hooks, capture_logits=[step], progress=False)
    state = run.states[step]
    where = state.is_masked & state.is_response
    p = torch.log_softmax(run.logits[step][where].double(), -1)
    q = torch.log_softmax(steered.logits[step][where].double(), -1)
    return (p.exp() * (p - q)).sum(-1), int(where.sum())


def test_replay_equals_masked_kl_and_the_former_manual_computation(model):
    hooks = ablate(model, random_unit(model.cfg.d_model, 1))
    ref = kl_reference(model, PROMPTS, steps=[0, 3, 6], generate_kwargs=OPTS, batch_size=3)
    got = ref.measure(model, hooks).masked
    again = masked_kl(model, PROMPTS, hooks, steps=[0, 3, 6], generate_kwargs=OPTS, batch_size=3)
    assert got.steps == again.steps == [0, 3, 6] and torch.equal(got.per_step, again.per_step) and got.mean == again.mean
    manual = [manual_masked_kl(model, hooks, s) for s in (0, 3, 6)]
    assert got.n_positions.tolist() == [n for _, n in manual] and got.n_positions[0] == 3 * 8
    torch.testing.assert_close(got.per_step, torch.stack([kl.mean() for kl, _ in manual]), atol=1e-6, rtol=0)
    everything = torch.cat([kl for kl, _ in manual])
    assert math.isclose(got.mean, float(everything.mean()), abs_tol=1e-6) and got.mean > 0
    # several batches (padding differs) measure the same positions and nearly the same KL
    split = kl_reference(model, PROMPTS, steps=[0, 3, 6], generate_kwargs=OPTS, batch_size=2).measure(model, hooks)
    assert len(kl_reference(model, PROMPTS, steps=[0], generate_kwargs=OPTS, batch_size=2).batches) == 2
    assert torch.equal(split.masked.n_positions, got.n_positions)
    torch.testing.assert_close(split.masked.per_step, got.per_step, atol=1e-5, rtol=1e-4)


def test_weight_edit_equals_runtime_ablation_and_the_unmodified_model_measures_zero(model):
    r = random_unit(model.cfg.d_model, 2)
    ref = kl_reference(model, PROMPTS, steps=[0, 2, 5, 7], generate_kwargs=OPTS, batch_size=2)
    unmodified = ref.measure(model)
    assert torch.all(unmodified.masked.per_step == 0) and unmodified.masked.mean == 0.0
    assert torch.all(unmodified.first_position == 0)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r)
    by_weights, by_hooks = ref.measure(edited), ref.measure(model, hooks=ablate(model, r))
    assert by_hooks.masked.mean > 1e-3 and by_hooks.first_position.shape == (3,)
    torch.testing.assert_close(by_weights.masked.per_step, by_hooks.masked.per_step, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_weights.first_position, by_hooks.first_position, atol=1e-6, rtol=0)
    assert math.isclose(by_weights.masked.mean, by_hooks.masked.mean, abs_tol=1e-6)
    # the recorded model is untouched by the edit of its copy, and the reference can be reused
    assert ref.measure(model).masked.mean == 0.0


@pytest.mark.parametrize("steps", [[0, 4], [5]])
def test_first_position_equals_first_position_kl(model, steps):
    hooks = ablate(model, random_unit(model.cfg.d_model, 3))
    ref = kl_reference(model, PROMPTS, steps=steps, generate_kwargs=OPTS, batch_size=2)
    expected = first_position_kl(model, PROMPTS, hooks, gen_length=OPTS["gen_length"], batch_size=2)
    got = ref.measure(model, hooks).first_position
    assert bool((expected > 0).all())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_max_bytes_bounds_the_reference_before_and_while_it_runs(model):
    vocab = model.cfg.d_vocab_out
    bound = (2 * 3 * 8 + 3) * 4 * vocab  # 2 steps x 3 prompts x 8 response positions, + 3 first positions, float32
    message = r"51 positions x 2048 tokens x 4 bytes.*fewer steps= \(now 2 of 8\), fewer prompts"
    with pytest.raises(ValueError, match=message):
        kl_reference(model, PROMPTS, steps=[0, 1], generate_kwargs=OPTS, max_bytes=bound - 1)
    ref = kl_reference(model, PROMPTS, steps=[0, 1], generate_kwargs=OPTS, max_bytes=None)
    kept = sum(t.numel() * 4 for b in ref.batches for t in [*b.log_probs.values(), b.first])
    assert all(b.prefill is None for b in ref.batches)
    assert kept <= bound and ref.nbytes > kept  # the bound covers the log-probabilities; nbytes adds the recorded run
    # step 0 keeps every response position, so the bound passes and the recorded run tips it over
    at_zero = kl_reference(model, PROMPTS, steps=[0], generate_kwargs=OPTS, max_bytes=None)
    with pytest.raises(ValueError, match="after 1 of 1 batches"):
        kl_reference(model, PROMPTS, steps=[0], generate_kwargs=OPTS, max_bytes=at_zero.nbytes - 1)
    for wrong in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes must be a positive int"):
            kl_reference(model, PROMPTS, generate_kwargs=OPTS, max_bytes=wrong)
    # masked_kl keeps one batch's reference at a time: the limit applies per batch
    hooks = ablate(model, random_unit(model.cfg.d_model))
    one = kl_reference(model, PROMPTS[:1], steps=[0], generate_kwargs=OPTS, max_bytes=None).nbytes
    streamed = masked_kl(model, PROMPTS, hooks, steps=[0], generate_kwargs=OPTS, batch_size=1, max_bytes=2 * one)
    assert streamed.mean == kl_reference(model, PROMPTS, steps=[0], generate_kwargs=OPTS, batch_size=1,
                                         max_bytes=None).measure(model, hooks).masked.mean
    with pytest.raises(ValueError, match="for one batch of 3 prompts"):
        masked_kl(model, PROMPTS, hooks, steps=[0], generate_kwargs=OPTS, batch_size=3, max_bytes=2 * one)


def test_wrong_options_and_incompatible_models_are_refused(model):
    with pytest.raises(ValueError, match=r"may not set \[.hooks.\].*pass hooks to measure"):
        kl_reference(model, PROMPTS, generate_kwargs=dict(OPTS, hooks=ablate(model, random_unit(128))))
    with pytest.raises(ValueError, match=r"steps \[8\] are outside the run's 0..7"):
        kl_reference(model, PROMPTS, steps=[0, 8], generate_kwargs=OPTS)
    ref = kl_reference(model, PROMPTS, steps=[0], generate_kwargs=OPTS)
    other = load("llada-tiny-mha")
    with pytest.raises(ValueError, match=r"d_vocab_out 2048 \(recorded\) vs 320.*d_model 128 \(recorded\) vs 64"):
        ref.measure(other)


def test_rank_correlation_hand_computed():
    # ranks x [1 3 2 4], y [1 4 2 3]: sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15)
    assert rank_correlation([0.1, 0.4, 0.2, 0.9], [1.0, 3.0, 2.0, 2.5]) == pytest.approx(0.8, abs=1e-12)
    # ties: x ranks [1 2.5 2.5 4], y [1 2 3 4]: 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    tied = rank_correlation(torch.tensor([1.0, 2.0, 2.0, 3.0]), [10, 20, 30, 40])
    assert tied == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert rank_correlation([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0, abs=1e-12)
    assert rank_correlation([1, 5, 2, 8, 3], [1, 100, 4, 1e6, 9]) == pytest.approx(1.0, abs=1e-12)  # order only


@pytest.mark.parametrize("x, y, match", [
    ([1, 2, 3], [1, 2], "got 3 and 2 items"),
    ([1, 2], [2, 1], "at least 3 pairs"),
    ([1, 1, 1], [1, 2, 3], "x is constant"),
    ([1, 2, 3], [4, 4, 4], "y is constant"),
    ([1, float("nan"), 3], [1, 2, 3], r"x holds NaN or inf at \[1\]"),
    ([[1, 2], [3, 4]], [1, 2], "1-D"),
])
def test_rank_correlation_refuses_what_has_no_rank_order(x, y, match):
    with pytest.raises(ValueError, match=match):
        rank_correlation(x, y)


def test_windowed_forwards_score_the_columns_they_compute():
    """Under a KV cache (and DiffusionGemma's encoder / decoder passes) a forward predicts its window only: the
    reference keeps the still-masked (undecided) positions there, and the first position is read at the first
    forward that predicts the first response column (DiffusionGemma's step 0 is an encoder prefill)."""
    tokens = torch.randint(5, 300, (3, 6), generator=torch.Generator().manual_seed(0))
    cached = load("llada-tiny-mha")
    ref = kl_reference(cached, tokens, generate_kwargs=dict(OPTS, kv_cache="dual"), batch_size=2)
    windows = [state.computed for state in ref.batches[0].run.states]
    assert windows[1] == slice(6, 10) and windows[4] == slice(0, 14)
    for step, where in ref.batches[0].where.items():
        assert not where[:, : windows[step].start].any() and not where[:, windows[step].stop :].any()
    hooks = ablate(cached, random_unit(64, 1))
    assert ref.measure(cached).masked.mean == 0.0 and ref.measure(cached, hooks).masked.per_step[1] > 0
    torch.testing.assert_close(ref.measure(cached, hooks).first_position,
                               first_position_kl(cached, tokens, hooks, gen_length=8, batch_size=2), atol=1e-6, rtol=0)

    gemma = load("diffusion-gemma-tiny")
    ref = kl_reference(gemma, tokens, steps=[0, 1, 2], batch_size=2)
    assert [b.first_step for b in ref.batches] == [1, 1]
    zero, ablated = ref.measure(gemma), ref.measure(gemma, ablate(gemma, random_unit(gemma.cfg.d_model, 1)))
    assert ablated.masked.n_positions[0] == 0 and math.isnan(ablated.masked.per_step[0]) and ablated.masked.mean > 0
    assert zero.masked.mean == 0.0 and torch.all(zero.first_position == 0) and torch.all(ablated.first_position > 0)


def test_prefill_proxy_is_the_encoder_next_token_kl():
    """On a run that opens with a prompt prefill (DiffusionGemma's autoregressive encoder) the reference also
    scores that pass's next-token prediction at the last prompt column: heretic's encoder proxy, computed
    here by hand from two encoder forwards. One-pass mask families have no prefill (None)."""
    tokens = torch.randint(5, 300, (3, 6), generator=torch.Generator().manual_seed(1))
    gemma = load("diffusion-gemma-tiny")
    hooks = ablate(gemma, random_unit(gemma.cfg.d_model, 2))
    ref = kl_reference(gemma, tokens, steps=[1, 2], batch_size=2)
    zero, ablated = ref.measure(gemma), ref.measure(gemma, hooks)
    base = torch.log_softmax(gemma(tokens, pass_name="encoder")[:, -1].double(), -1)
    edited = torch.log_softmax(gemma.run_with_hooks(tokens, fwd_hooks=hooks, pass_name="encoder")[:, -1].double(), -1)
    by_hand = (base.exp() * (base - edited)).sum(-1)
    assert torch.all(zero.prefill == 0) and torch.all(ablated.prefill > 0)
    torch.testing.assert_close(ablated.prefill, by_hand, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ablated.prefill, ablated.first_position)  # a different prediction: the decoder's

    llada = load("llada-tiny-mha")
    assert kl_reference(llada, tokens, generate_kwargs=OPTS, batch_size=2).measure(llada).prefill is None
