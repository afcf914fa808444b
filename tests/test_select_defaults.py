"""Issue 10, item 11: `select_direction` with its defaults finds a direction on the embedded
`tiny-refusal` model. The induce filter asks for a refusal score above the unsteered model's
(masked diffusion: the step-0 first-position prediction is a marginal over a fully masked
response and rarely crosses 0), instead of Arditi's autoregressive threshold of 0."""

import warnings

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.evals import refusal_score
from diffusion_lens.steering import Directions, ablate, mean_difference, select_direction
from diffusion_lens.studies.tiny_refusal.data import generate_dataset, prompts
from tests.test_steering_core import one_thread  # noqa: F401  (autouse fixture)

GEN = 32


@pytest.fixture(scope="module")
def study():
    torch.set_grad_enabled(False)
    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    data = generate_dataset(n_train=128, n_val=64, n_test=0, seed=1)

    def both(split, kind, n):
        return [p for lang in ("en", "zh") for p in prompts(data[split], kind=kind, lang=lang)[:n]]

    sets = [both("train", "harmful", 16), both("train", "harmless", 16), both("val", "harmful", 8),
            both("val", "harmless", 8)]
    candidates = mean_difference(model, sets[0], sets[1], layers="all", positions="post_instruction", gen_length=GEN,
                                 progress=False)
    yield model, sets, candidates
    torch.set_grad_enabled(True)


def test_defaults_return_a_direction_that_bypasses_refusal(study):
    model, sets, candidates = study
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today: "every candidate was filtered out"
        sel = select_direction(model, *sets, gen_length=GEN, progress=False)
    assert sel.winner is not None
    assert torch.equal(sel.directions.mean_positive, candidates.mean_positive)  # defaults: the same candidates
    # every kept candidate pushes harmless prompts towards refusal, relative to the unsteered model
    assert bool((sel.induce[sel.kept] > sel.baseline["harmless"]).all())
    # the winner works: ablating it lowers the harmful refusal score on held-out validation prompts
    harmful_val = sets[2]
    base = refusal_score(model, harmful_val, gen_length=GEN).mean()
    ablated = refusal_score(model, harmful_val, hooks=ablate(model, sel.winner["direction"]), gen_length=GEN).mean()
    assert sel.winner["bypass"] < sel.baseline["harmful"] and ablated < base - 1.0


def test_arditi_absolute_threshold_stays_available_and_explains_itself(study):
    model, sets, candidates = study
    with pytest.warns(UserWarning, match=r"every candidate was filtered out \(failed filters: induce: \d+"):
        sel = select_direction(model, *sets, candidates=candidates, induce_threshold=0.0, gen_length=GEN, progress=False)
    assert sel.winner is None
    assert all("induce" in r or r.startswith("zero direction") for row in sel.reasons for r in row)
    with pytest.raises(ValueError, match="induce_threshold must be 'baseline' or a number; got 'base'"):
        select_direction(model, *sets, candidates=candidates, induce_threshold="base", gen_length=GEN)


def test_concat_joins_position_kinds_for_one_sweep(study):
    model, sets, candidates = study
    pooled = mean_difference(model, sets[0], sets[1], layers="all", positions="mean_response", gen_length=GEN,
                             progress=False)
    both = Directions.concat([candidates, pooled])
    assert both.positions == candidates.positions + ["mean_response"]
    assert torch.equal(both.vector(3, "mean_response"), pooled.vector(3, "mean_response"))
    assert torch.equal(both.vector(3, "post_instruction[-1]"), candidates.vector(3, "post_instruction[-1]"))
    with pytest.raises(ValueError, match=r"Position labels \['mean_response'\] appear in more than one part"):
        Directions.concat([pooled, pooled])
    other = mean_difference(model, sets[0], sets[1], layers=[1], positions="last_prompt", gen_length=GEN, progress=False)
    with pytest.raises(ValueError, match=r"different layers: \[0, 1, 2, 3, 4, 5\] vs \[1\]"):
        Directions.concat([candidates, other])
