"""Issue 16 item 6: per-expert ablation vs combined-output ablation on tiny-refusal-moe (LLaDA-MoE
format, 6 layers, 8 routed experts, top-2, softmax router, no shared expert, untied head).

The direction is the demo's recipe on fewer prompts: difference of means of the block inputs at
layer 3, mean over the response (16 harmful vs 16 harmless training prompts, both languages). Three
edits, all along that one direction r at every layer:

* combined output: r projected out of each layer's MoE output at run time (`blocks.{l}.hook_mlp_out`,
  as `moe_conditions` builds "combined_output");
* per expert: `AbliterationEdit` with an "experts" kernel of weight 1 at every layer, applied to the
  weights (every routed expert's down projection);
* every component: the same with the attention outputs and the embedding rows (weight 1) too.

What the tests measure, on the step-0 canvas (prompt + 16 masks) of 4 harmful prompts (numbers:
|weighted expert output . r| / |weighted expert output|, over each routed expert's tokens):

(a) Combined-output ablation leaves r readable inside the experts: every routed expert's weighted
    output keeps a projection of 0.045-0.28 of its norm on r (mean 0.15; unedited 0.04-0.28),
    although the layer's MoE output has none (< 2e-8). (b) The per-expert weight edit makes every
    expert's output orthogonal to r (< 3e-8 measured; asserted < 1e-4): r is each expert's writer
    basis here, as no weighted norm follows a pre-norm block's writers.
(c) Routing. Mechanically guaranteed, and asserted: without a shared expert and with no bias, the
    combined-output ablation and the per-expert edit are the same function (the routed sum is
    linear in the experts' outputs: logits agree within 1e-5, fp32 rounding), so they differ only
    inside the experts; and layer 0's router logits are untouched (the edit is downstream).
    Measured, and asserted only as "still there": the routers' input (ln2 of `hook_resid_mid`)
    keeps r, because the embedding and attention keep writing it (relative projection 0.18-0.26,
    0.9-1.1 times the unedited one), and the routers read it: removing r from a router's input
    alone changes the top-2 choice of 23-43% of the tokens at every layer. So under
    combined-output ablation the routing still depends on the direction; only the every-component
    edit (embedding, attention, experts) takes r out of the residual stream (0.0) and so out of
    every router's input.
(d) The tied-weights trap: tests/test_abliteration_edit.py checks storage identity and that the
    LM head reads the edit, in the default (encoder) pass; here the DiffusionGemma fixture's decoder
    pass is checked too (its weights are the encoder's: one set of modules).

Not a test: behaviour. On 8 English harmful dev prompts (gen_length 32) with this 16-prompt
direction, refusal is 1.00 unedited, 1.00 with combined-output ablation and 0.50 with every
component edited; directions from 64 / 128 training prompts give 0.25 / 0.00 (en) and 0.00 / 0.125
(zh), combined-output ablation 1.00 throughout (the card's 0.00 / 0.00 uses the demo's validated
direction). One condition's 8 generations take 13-18 s on the shared 2 cores: neither robust nor
fast enough to assert.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.steering import AblationKernel, AbliterationEdit, ablate, mean_difference
from diffusion_lens.studies.abliteration import prompt_sets
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def moe():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal-moe")


@pytest.fixture(scope="module")
def sets():
    return prompt_sets("tiny-refusal-moe", None, None, n_train=16, n_eval=16)


@pytest.fixture(scope="module")
def r(moe, sets) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This model ignores the attention mask")
        dirs = mean_difference(moe, sets["harmful_train"], sets["harmless_train"], layers=[3],
                               positions="mean_response", gen_length=32, batch_size=16, progress=False)
    direction = dirs.directions[0, 0].double()
    return direction / direction.norm()


def edit(moe, r, *kinds) -> AbliterationEdit:
    """Weight 1 at every layer for each block kind in `kinds`; "embedding" weight 1."""
    everywhere = AblationKernel(1.0, 0.0, 1.0, float(moe.cfg.n_layers))
    weights = {kind: 1.0 if kind == "embedding" else everywhere for kind in kinds}
    return AbliterationEdit(r.float().expand(moe.cfg.n_layers, -1).clone(), weights)


def combined_hooks(moe, r):
    return ablate(moe, r.float(), layers=list(moe.cfg.moe_layers), sites=("hook_mlp_out",))


@pytest.fixture(scope="module")
def canvas(moe, sets) -> torch.Tensor:
    tokens = moe.to_tokens(sets["harmful_eval"][:4], chat=True)
    return torch.cat([tokens, torch.full((tokens.shape[0], 16), moe.cfg.mask_token_id)], dim=1)


def keep(name: str) -> bool:
    return name.endswith(("hook_out", "hook_expert_weights", "hook_mlp_out", "hook_resid_mid", "hook_router_logits"))


@pytest.fixture(scope="module")
def caches(moe, r, canvas) -> dict:
    """(logits, cache) of the canvas: unedited, combined-output hooks, per-expert edit, every component."""
    out = {}
    with torch.no_grad():
        out["baseline"] = moe.run_with_cache(canvas, names_filter=keep)
        with moe.hooks(fwd_hooks=combined_hooks(moe, r)):
            out["combined"] = moe.run_with_cache(canvas, names_filter=keep)
        with edit(moe, r, "experts").applied(moe):
            out["per_expert"] = moe.run_with_cache(canvas, names_filter=keep)
        with edit(moe, r, "embedding", "attention", "experts").applied(moe):
            out["every"] = moe.run_with_cache(canvas, names_filter=keep)
    return out


def expert_projections(moe, cache, r) -> dict[tuple[int, int], float]:
    """(layer, expert) -> |weighted output . r| / |weighted output| over the expert's routed tokens."""
    out = {}
    for layer in moe.cfg.moe_layers:
        weights = cache[f"blocks.{layer}.mlp.hook_expert_weights"]
        for e in range(moe.cfg.n_experts):
            rows = (weights[..., e] != 0).nonzero()
            if not len(rows):
                continue
            y = cache[f"blocks.{layer}.mlp.experts.{e}.hook_out"].double() * weights[rows[:, 0], rows[:, 1], e].double()[:, None]
            out[layer, e] = float((y @ r).abs().sum() / y.norm(dim=-1).sum())
    return out


def relative_projection(x: torch.Tensor, r: torch.Tensor) -> float:
    x = x.double()
    return float((x @ r).abs().mean() / x.norm(dim=-1).mean())


def test_combined_output_ablation_leaves_the_direction_readable_inside_the_experts(moe, r, caches):
    _, cache = caches["combined"]
    projections = expert_projections(moe, cache, r)
    assert {layer for layer, _ in projections} == set(moe.cfg.moe_layers) and len(projections) >= 40
    assert min(projections.values()) > 0.01 and sum(projections.values()) / len(projections) > 0.08, projections
    for layer in moe.cfg.moe_layers:  # while the layer's combined output carries none of it
        assert relative_projection(cache[f"blocks.{layer}.hook_mlp_out"], r) < 1e-5


def test_the_per_expert_edit_makes_every_expert_orthogonal_to_the_direction(moe, r, caches):
    _, cache = caches["per_expert"]
    projections = expert_projections(moe, cache, r)
    assert len(projections) >= 40 and max(projections.values()) < 1e-4, projections
    _, base = caches["baseline"]
    assert min(expert_projections(moe, base, r).values()) > 0.01  # the unedited experts do write r


def test_routing_under_combined_output_ablation_still_reads_the_direction(moe, r, caches):
    (base_logits, base), (comb_logits, comb) = caches["baseline"], caches["combined"]
    per_logits, _ = caches["per_expert"]
    _, every = caches["every"]
    # by linearity of the routed sum (no shared expert): the same function as the per-expert edit
    torch.testing.assert_close(comb_logits, per_logits, atol=1e-4, rtol=0)
    assert (comb_logits - base_logits).abs().max() > 0.1
    torch.testing.assert_close(comb["blocks.0.mlp.hook_router_logits"], base["blocks.0.mlp.hook_router_logits"],
                               atol=0, rtol=0)  # the edit is downstream of layer 0's router
    changed_by_r = []
    for layer in moe.cfg.moe_layers:
        kept = relative_projection(comb[f"blocks.{layer}.hook_resid_mid"], r)
        assert kept > 0.05 and kept > 0.5 * relative_projection(base[f"blocks.{layer}.hook_resid_mid"], r)
        assert relative_projection(every[f"blocks.{layer}.hook_resid_mid"], r) < 1e-5
        block, resid = moe.blocks[layer], comb[f"blocks.{layer}.hook_resid_mid"].double()
        without_r = resid - (resid @ r)[..., None] * r
        with torch.no_grad():
            chosen = [block.mlp.routing_weights(block.ln2(x.float())) != 0 for x in (resid, without_r)]
        changed_by_r.append(float((chosen[0] != chosen[1]).any(-1).float().mean()))
    assert min(changed_by_r) > 0.05, changed_by_r  # every router's choice depends on r


def test_the_decoder_pass_of_a_tied_model_sees_the_edit():
    """DiffusionGemma: embedding tied to the LM head, one set of modules for both passes. fp64, so the
    edited decoder pass must equal its runtime twin to 1e-9; embedding weight 0.5, so an embedding
    edited twice (once per name) would leave 0.25 of r, not 0.5, and fail."""
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny").to(torch.float64)
    assert model.unembed.weight is model.embed.weight
    directions = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    kernel = AblationKernel(1.0, 0.0, 1.0, float(model.cfg.n_layers))
    trial = AbliterationEdit.from_directions(directions, {"embedding": 0.5, "attention": kernel, "experts": kernel},
                                             index=1.0)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    ptr = model.embed.weight.data_ptr()
    with torch.no_grad():
        plain = model(tokens, pass_name="decoder")
        twin = model.run_with_hooks(tokens, fwd_hooks=trial.hooks(model), pass_name="decoder")
        with trial.applied(model) as handle:
            assert handle.names.count("embed.weight") == 1 and "unembed.weight" not in handle.names
            assert model.embed.weight.data_ptr() == ptr and model.unembed.weight is model.embed.weight
            edited = model(tokens, pass_name="decoder")
    torch.testing.assert_close(edited, twin, atol=1e-9, rtol=0)
    assert (edited - plain).abs().max() > 0.1
