"""Issue 16, item 1 (blog finding 4): the learned low-rank refusal subspace. Its objective is a
differentiable forward of the step-0 canvas with span(Q) projected out of the residual stream;
it must equal what the full-weight `AbliterationEdit` of the learned basis does, leave the frozen
model untouched, and beat the difference-of-means direction it starts from."""

import pytest
import torch

from diffusion_lens.evals import refusal_score
from diffusion_lens.steering import AblationKernel, AbliterationEdit, learn_subspace, mean_difference

from tests.test_abliterate import model, sets  # noqa: F401  (module fixtures: tiny-refusal and its toy prompt sets)

GEN = 8


@pytest.fixture(scope="module")
def init(model, sets):
    """The post-instruction difference of means after block 3 (the search's usual starting point)."""
    dirs = mean_difference(model, sets["harmful_train"], sets["harmless_train"], layers=3,
                           positions="post_instruction", site="hook_resid_post", gen_length=GEN, progress=False)
    return dirs.directions[0, -1]


@pytest.fixture(scope="module")
def learned(model, sets, init):
    """A rank-2 subspace from `init`, with one parameter left trainable (its flag must survive)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.embed.weight.requires_grad_(True)
    try:
        sub = learn_subspace(model, sets["harmful_train"], sets["harmless_train"], rank=2, init=init, steps=8,
                             gen_length=GEN, batch_size=8)
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        grads = [name for name, p in model.named_parameters() if p.grad is not None]
    finally:
        model.embed.weight.requires_grad_(False)
    return sub, before, flags, grads


def full_edit(model, directions) -> AbliterationEdit:
    """Weight 1 on every writer of every layer, embedding included."""
    every = AblationKernel(1.0, 0.0, 1.0, float(model.cfg.n_layers))
    return AbliterationEdit(directions, {"embedding": 1.0, "attention": every, "mlp": every})


def test_the_objective_falls_and_the_basis_is_orthonormal(learned):
    sub = learned[0]
    assert len(sub.losses) == len(sub.refusal) == len(sub.kl) == 9  # steps + the returned basis
    assert sub.losses[-1] < sub.losses[0] - 1.0
    assert sub.losses == pytest.approx([r + k for r, k in zip(sub.refusal, sub.kl)])  # kl_weight 1
    assert sub.basis.shape == (2, 128) and sub.basis.dtype == torch.float64 and sub.basis.device.type == "cpu"
    torch.testing.assert_close(sub.basis @ sub.basis.T, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert sub.summary()["loss"] == [sub.losses[0], sub.losses[-1]]


def test_the_frozen_model_is_untouched(model, learned):
    _, before, flags, grads = learned
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # bitwise
    assert grads == []  # not even the parameter left trainable got a gradient
    assert flags["embed.weight"] and not any(flag for name, flag in flags.items() if name != "embed.weight")
    assert all(not point.fwd_hooks and not point.bwd_hooks for point in model.hook_dict.values())


def test_the_objective_is_the_full_weight_edit_and_beats_its_init(model, sets, init, learned):
    sub = learned[0]
    harmful, ids = sets["harmful_train"], sub.options["refusal_tokens"]
    score = lambda: refusal_score(model, harmful, refusal_tokens=ids, gen_length=GEN).mean().item()  # noqa: E731
    base = score()
    n_layers = model.cfg.n_layers
    with full_edit(model, sub.basis.expand(n_layers, -1, -1).clone()).applied(model):
        learned_score = score()
    with full_edit(model, init.expand(n_layers, -1).clone()).applied(model):
        init_score = score()
    assert learned_score == pytest.approx(sub.refusal[-1], abs=1e-4)  # the hooks are exactly the weight edit
    assert learned_score < init_score - 1.0 and init_score < base


def test_learning_is_deterministic_for_a_seed(model, sets):
    run = lambda seed: learn_subspace(model, sets["harmful_train"][:4], sets["harmless_train"][:4], rank=2,  # noqa: E731
                                      steps=2, gen_length=GEN, seed=seed).basis
    first = run(0)
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))


def test_hooks_are_removed_and_flags_restored_after_an_exception(model, sets, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("boom in the optimiser")

    monkeypatch.setattr(torch.optim.Adam, "step", boom)
    with pytest.raises(RuntimeError, match="boom in the optimiser"):
        learn_subspace(model, sets["harmful_train"][:2], sets["harmless_train"][:2], steps=3, gen_length=GEN)
    assert all(not point.fwd_hooks and not point.bwd_hooks for point in model.hook_dict.values())
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_bad_input_is_an_error(model, sets, monkeypatch):
    harmful, harmless = sets["harmful_train"][:2], sets["harmless_train"][:2]
    for kwargs, match in [(dict(rank=0), r"rank must be an int in \[1, d_model=128\]"),
                          (dict(rank=129), r"rank must be an int in \[1, d_model=128\]"),
                          (dict(steps=0), "steps must be an int >= 1"), (dict(lr=0.0), "lr must be > 0"),
                          (dict(gen_length=0), "gen_length must be an int >= 1"),
                          (dict(init=torch.randn(64)), r"init must be a direction \[d_model=128\]"),
                          (dict(rank=1, init=torch.randn(2, 128)), "init has 2 rows but rank=1")]:
        with pytest.raises(ValueError, match=match):
            learn_subspace(model, harmful, harmless, **{"gen_length": GEN, **kwargs})
    with pytest.raises(ValueError, match="harmful is empty"):
        learn_subspace(model, [], harmless, gen_length=GEN)
    with pytest.raises(ValueError, match="harmless is empty"):
        learn_subspace(model, harmful, [], gen_length=GEN)
    monkeypatch.setattr(model.cfg, "mask_token_id", None)
    with pytest.raises(ValueError, match="has no mask token: its canvas is noise"):
        learn_subspace(model, harmful, harmless, gen_length=GEN)
