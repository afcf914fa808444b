"""Issue 5, direction selection: `select_direction` finds a refusal direction planted into a fixture
model's weights, and its filters / table behave as documented."""

import pytest
import torch

from diffusion_lens.evals import refusal_score
from diffusion_lens.steering import ablate
from diffusion_lens.steering.selection import Selection, select_direction
from tests.test_steering_core import load, one_thread  # noqa: F401  (autouse fixture)

REFUSAL_TOKEN = 7
HARM_TOKENS = torch.arange(200, 240)


def planted_model(seed=0):
    """llada-tiny-mha with a planted 'refusal' direction r.

    Embeddings lose their r component, then 'harmful' tokens 200..239 get +4 r; every layer-0
    head copies the r component (value dim 0 reads x.r, the output projection writes r back), so
    the masked response positions inherit it; the unembedding row of token 7 reads r. Harmful
    prompts then predict token 7 at the first masked position; harmless ones do not.
    """
    model = load("llada-tiny-mha")
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(model.cfg.d_model, generator=g)
    r /= r.norm()
    with torch.no_grad():
        emb = model.embed.weight
        emb -= torch.outer(emb @ r, r)
        emb[HARM_TOKENS] += 4 * r
        attn, d_head = model.blocks[0].attn, model.cfg.d_head
        for head in range(model.cfg.n_heads):
            attn.v_proj.weight[head * d_head] = 3 * r / model.blocks[0].ln1.weight
            attn.o_proj.weight[:, head * d_head] = 3 * r
        model.unembed.weight[REFUSAL_TOKEN] = 4 * r / model.ln_final.weight
    return model, r, g


def prompts(g, n, harmful):
    base = torch.randint(0, 200, (n, 8), generator=g)
    if harmful:
        base[:, 2:6] = HARM_TOKENS[torch.randint(0, len(HARM_TOKENS), (n, 4), generator=g)]
    return base


def test_select_direction_finds_the_planted_direction():
    model, r, g = planted_model()
    harm_tr, harm_val = prompts(g, 16, True), prompts(g, 8, True)
    ok_tr, ok_val = prompts(g, 16, False), prompts(g, 8, False)
    assert (refusal_score(model, harm_val, refusal_tokens=[REFUSAL_TOKEN], gen_length=8) > 0).all()
    assert (refusal_score(model, ok_val, refusal_tokens=[REFUSAL_TOKEN], gen_length=8) < 0).all()
    sel = select_direction(model, harm_tr, ok_tr, harm_val, ok_val,
                           positions=["prompt[-3]", "last_prompt", "response[0]"], refusal_tokens=[REFUSAL_TOKEN],
                           gen_length=8, batch_size=8)
    assert isinstance(sel, Selection) and sel.winner is not None
    assert float(sel.winner["direction"].float() @ r) > 0.95
    assert sel.bypass.shape == sel.induce.shape == sel.kl.shape == (3, 3)
    # the winner is the lowest bypass among kept candidates, and kept ones pass every filter
    kept = sel.kept
    assert sel.winner["bypass"] == float(sel.bypass[kept].min())
    assert (sel.kl[kept] <= 0.1).all() and (sel.induce[kept] > 0).all()
    # layer 0, offset 0 (the mask token embedding) has no class difference: filtered with a reason
    assert "zero direction" in sel.reasons[0][2] and not kept[0, 2]
    # ablating the winner removes refusal on harmful prompts
    ablated = refusal_score(model, harm_val, refusal_tokens=[REFUSAL_TOKEN], gen_length=8, hooks=ablate(model, sel.winner["direction"]))
    assert (ablated < 0).all()
    rows = sel.table
    assert len(rows) == 9 and {"layer", "position", "bypass", "induce", "kl", "kept", "reason"} <= set(rows[0])


def test_layer_cut_and_prompt_filtering():
    model, r, g = planted_model(1)
    harm, ok = prompts(g, 8, True), prompts(g, 8, False)
    with pytest.warns(UserWarning, match="filtered out"):
        sel = select_direction(model, harm, ok, harm, ok, layers=[1, 2], positions=["last_prompt"], refusal_tokens=[REFUSAL_TOKEN],
                               gen_length=4, max_layer_fraction=0.3, filter_prompts=True)
    assert not sel.kept.any() and sel.winner is None
    assert all("layer" in reason and ">= 0.3 x 3" in reason for row in sel.reasons for reason in row)
    sel = select_direction(model, harm, ok, harm, ok, layers=[1, 2], positions=["last_prompt"], refusal_tokens=[REFUSAL_TOKEN],
                           gen_length=4, max_layer_fraction=0.5, filter_prompts=True)
    assert sel.winner["layer"] == 1 and "layer 2" in sel.reasons[1][0]


def test_selection_argument_errors():
    model, _, g = planted_model()
    p = prompts(g, 4, True)
    with pytest.raises(ValueError, match="no tokenizer"):
        select_direction(model, p, p, p, p, positions=["last_prompt"])
    with pytest.raises(ValueError, match="outside 0..319"):
        select_direction(model, p, p, p, p, positions=["last_prompt"], refusal_tokens=[999])
    with pytest.raises(TypeError, match="Directions"):
        select_direction(model, p, p, p, p, refusal_tokens=[7], candidates=torch.zeros(3))


def test_cross_lingual_transfer_with_two_token_languages():
    """'Language A' harmful tokens 200..219 and 'language B' 220..239 share the planted direction:
    the direction from A removes refusal on B, and B's own direction is nearly parallel."""
    from diffusion_lens.studies import cross_lingual_transfer
    from diffusion_lens.steering import mean_difference

    model, r, g = planted_model(2)

    def lang(n, lo, harmful=True):
        base = torch.randint(0, 200, (n, 8), generator=g)
        if harmful:
            base[:, 2:6] = torch.randint(lo, lo + 20, (n, 4), generator=g)
        return base

    a_harm, a_ok, b_harm, b_ok = lang(12, 200), lang(12, 0, False), lang(8, 220), lang(8, 0, False)
    r_a = mean_difference(model, a_harm, a_ok, layers=[1], positions="last_prompt", gen_length=4).unit(1, "last_prompt")
    res = cross_lingual_transfer(model, r_a, b_harm, target_harmless=b_ok, layer=1, position="last_prompt",
                                 refusal_tokens=[REFUSAL_TOKEN], gen_length=4)
    assert res["refusing_base"] == 1.0 and res["refusing_ablated"] == 0.0
    assert res["score_ablated"] < res["score_base"] and res["cosine"] > 0.9
    with pytest.raises(ValueError, match="tokenizer"):  # text refusal rates need decoded responses
        cross_lingual_transfer(model, r_a, b_harm[:2], refusal_tokens=[REFUSAL_TOKEN], gen_length=4,
                               generate_kwargs=dict(steps=4, gen_length=4, block_length=4))
    from tests.test_steering_core import make_chat_tokenizer

    model.tokenizer = make_chat_tokenizer()
    res = cross_lingual_transfer(model, r_a, b_harm[:3], refusal_tokens=[REFUSAL_TOKEN], gen_length=4,
                                 generate_kwargs=dict(steps=4, gen_length=4, block_length=4))
    assert 0.0 <= res["refusal_rate_base"] <= 1.0 and 0.0 <= res["refusal_rate_ablated"] <= 1.0


def test_refusal_score_uses_the_logit_shift_on_dream():
    """Dream predicts token j from residual position j-1: the first masked position's prediction is
    the last prompt position's logits."""
    from diffusion_lens.evals.scores import log_odds

    model = load("dream-tiny")
    tokens = torch.randint(0, 250, (2, 5), generator=torch.Generator().manual_seed(0))
    score = refusal_score(model, tokens, refusal_tokens=[3, 4], gen_length=3)
    canvas = torch.cat([tokens, torch.full((2, 3), model.cfg.mask_token_id)], 1)
    logits = model(canvas)
    torch.testing.assert_close(score, log_odds(logits[:, 4], torch.tensor([3, 4])))
