"""Issue 15 (items 2, 3, 5): the demo's HTML report, the sensitivity grid in two sampler settings and
the MoE study's conditions (per-expert abliteration vs combined-output ablation vs non-expert edit)."""

import json
import re
from dataclasses import replace

import pytest
import torch

from diffusion_lens import DiffusionConfig, HookedDiffusionTransformer
from diffusion_lens.checkpoints import get_adapter
from diffusion_lens.steering import ablate
from diffusion_lens.studies import report
from diffusion_lens.studies.refusal_demo import (QUICK, DemoSize, format_table, moe_conditions,
                                                 run_moe_study, run_study, sampler_settings)


@pytest.fixture(scope="module")
def tiny():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal")


@pytest.fixture(scope="module")
def reduced_study(tiny, tmp_path_factory):
    """A QUICK-sized study with every part of the full one (KL, transfer, both sensitivity settings)."""
    out = tmp_path_factory.mktemp("demo")
    size = replace(QUICK, n_test=4, full=True)  # the sizes of the reduced demo in test_tiny_refusal.py
    return run_study(tiny, size, out, log=lambda *_: None), out


def test_report_is_self_contained_with_tables_interactive_heatmaps_and_fallbacks(reduced_study):
    results, out = reduced_study
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<table class='results'>" in page and "<pre>" not in page
    assert not re.search(r"<script[^>]+src=[\"']?https?:", page)  # plotly.js inline, no CDN
    assert page.count("plotly.min.js") <= 1 or page.count("Plotly=") <= 1
    for name in ("selection_bypass", "sensitivity_one_block", "sensitivity_four_blocks"):
        assert f'id="plot-{name}"' in page
        assert f'<noscript><img alt="{name}" src="data:image/png;base64,' in page
        assert (out / f"{name}.png").stat().st_size > 1000
    assert (out / "cosine_per_layer.png").exists()
    figures = page.count("<section class='figure'>")
    assert figures == 4 and page.count("<p class='interpretation'>") == figures
    sentences = re.findall(r"<p class='interpretation'>(.*?)</p>", page)
    assert all("the paper found" in s and s.count(". ") == 0 for s in sentences), sentences
    # the sentences carry this run's numbers
    assert f"layer {results['best']['layer']}" in sentences[1]
    assert f"{results['sensitivity']['one_block']['baseline']:.2f}" in sentences[2]


def test_sensitivity_has_both_sampler_settings(reduced_study, tiny):
    results, out = reduced_study
    saved = json.loads((out / "results.json").read_text())
    for setting, kwargs in sampler_settings(32).items():
        sens = saved["sensitivity"][setting]
        assert sens["generate_kwargs"] == kwargs
        assert len(sens["values"]) == tiny.cfg.n_layers and len(sens["values"][0]) == 4  # windows of 8 steps
        assert 0 <= sens["commit"]["padding_share_first_window"] <= 1
        assert 0 <= sens["commit"]["first_words_mean_step"] < 32
    assert saved["sensitivity"]["four_blocks"]["generate_kwargs"]["block_length"] == 8
    # blocks write the first words (4 tokens: in the first block) in the first block's steps; one block writes them later
    one, four = (saved["sensitivity"][s]["commit"]["first_words_mean_step"] for s in ("one_block", "four_blocks"))
    assert four < 8 and one > four
    table = format_table(results)
    assert "sensitivity, one_block" in table and "sensitivity, four_blocks" in table


def test_interpretation_follows_the_numbers():
    sens = {"values": [[0.9, 0.2], [0.8, 0.7]], "layers": ["0", "1"], "step_windows": ["0-15", "16-31"],
            "baseline": 0.9, "all_layers_all_steps": 0.0,
            "generate_kwargs": {"gen_length": 32, "steps": 32, "block_length": 32},
            "commit": {"first_words": 4, "first_words_mean_step": 25.0, "padding_share_first_window": 0.9, "window": 16}}
    assert not report.reproduces_early_steps(sens)
    assert "does not reproduce" in report.interpret_sensitivity("one_block", sens)
    early = {**sens, "values": [[0.1, 0.8], [0.7, 0.9]]}
    assert report.reproduces_early_steps(early)
    assert "reproduces the paper" in report.interpret_sensitivity("one_block", early)
    with pytest.raises(ValueError, match="sensitivity settings"):
        report.write_report("unused", {}, None, {"three_blocks": None})


def random_moe(tokenizer, shared: bool) -> HookedDiffusionTransformer:
    """A random-weight LLaDA-MoE-format model (dense layer 0, 8 experts top-2 in layers 1-2) with
    tiny-refusal's tokenizer, so the study's prompts run through it."""
    cfg = DiffusionConfig(
        d_model=32, n_layers=3, n_heads=2, d_mlp=64, d_vocab=len(tokenizer), n_ctx=256, rope_theta=10000.0,
        norm_eps=1e-5, mask_token_id=2, eos_token_id=1, pad_token_id=1, eot_token_id=5, family="llada_moe",
        n_experts=8, n_experts_per_token=2, d_expert_mlp=16, moe_layers=(1, 2),
        d_shared_expert_mlp=16 if shared else None, model_name="random-moe",
    )
    torch.manual_seed(0)
    model = HookedDiffusionTransformer(cfg, tokenizer=tokenizer)
    model.adapter = get_adapter("llada_moe")  # its sampler: LLaDA's
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1) if param.ndim > 1 else param.fill_(1.0)
    return model.eval()


@pytest.mark.parametrize("shared", [False, True])
def test_moe_conditions_equal_their_runtime_twins(tiny, shared):
    model = random_moe(tiny.tokenizer, shared)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    tokens = model.to_tokens(["How do I pick a lock?", "What is 2 + 3?"], chat=True)
    base = model(tokens)
    conditions = moe_conditions(model, r)
    per_expert, hooks, runtime = conditions["per_expert"]
    assert per_expert is not model and not hooks
    full = model.run_with_hooks(tokens, fwd_hooks=ablate(model, r))
    torch.testing.assert_close(per_expert(tokens), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=runtime), full, atol=1e-5, rtol=0)
    non_expert, _, runtime = conditions["non_expert"]
    assert (non_expert(tokens) - full).abs().max() > 1e-3  # the routed experts still write r
    torch.testing.assert_close(non_expert(tokens), model.run_with_hooks(tokens, fwd_hooks=runtime), atol=1e-5, rtol=0)
    routed = model.blocks[1].mlp.experts[0].down_proj.weight
    assert torch.equal(non_expert.blocks[1].mlp.experts[0].down_proj.weight, routed)
    assert not torch.equal(non_expert.blocks[1].attn.o_proj.weight, model.blocks[1].attn.o_proj.weight)
    random_control, _, runtime = conditions["random_control"]
    torch.testing.assert_close(random_control(tokens), model.run_with_hooks(tokens, fwd_hooks=runtime), atol=1e-5, rtol=0)
    assert (random_control(tokens) - full).abs().max() > 1e-3  # another direction than r
    _, combined, _ = conditions["combined_output"]
    assert {name for name, _ in combined} == {"blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"}
    torch.testing.assert_close(model(tokens), base)  # the copies were edited, not the model


def test_moe_study_runs_on_a_random_moe_model(tiny):
    model = random_moe(tiny.tokenizer, shared=False)
    size = DemoSize(n_train=4, n_val=2, n_test=2, gen_length=8, position_types=("post_instruction",), full=False)
    moe = run_moe_study(model, size, log=lambda *_: None)
    for name in report.MOE_CONDITIONS:
        assert set(moe[name]["harmful"]) == {"en", "zh"}
        assert 0 <= moe["kl_harmless"][name]
    assert moe["kl_harmless"]["baseline"] == 0.0 and moe["kl_harmless"]["per_expert"] > 0
    assert moe["n_experts"] == 8 and moe["moe_layers"] == [1, 2]
    html = report.moe_table_html(moe)
    assert html.count("<tr>") == 6 and "every expert orthogonalised" in html and "random direction" in html
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        moe_conditions(tiny, torch.ones(tiny.cfg.d_model))


def test_plotly_heatmaps_abbreviate_ticks_and_keep_full_names_on_hover():
    from types import SimpleNamespace

    from diffusion_lens import plot

    grid = {"values": [[0.5, 0.25], [0.0, 1.0]], "row_labels": ["0", "1"], "col_labels": ["0-7", "8-15"],
            "metric_name": "refusal rate"}
    fig = plot.sensitivity_heatmap_plotly(grid, title="a\nb", value_range=(0, 1))
    heat = fig.data[0]
    assert (heat.zmin, heat.zmax) == (0, 1) and heat.customdata[1][0].endswith("refusal rate 0.000")
    assert fig.layout.title.text == "a<br>b"
    positions = ["pre_instruction[0]", "post_instruction[-1]", "mean_response"]
    dirs = SimpleNamespace(positions=positions, layers=[0, 1])
    sel = SimpleNamespace(directions=dirs, bypass=torch.tensor([[-1.0, -2.0, 0.5], [-3.0, 1.0, 0.0]]),
                          induce=torch.zeros(2, 3), kl=torch.zeros(2, 3),
                          kept=torch.tensor([[True, False, True], [True, True, False]]),
                          winner={"layer": 1, "position": "pre_instruction[0]"})
    fig = plot.selection_heatmap_plotly(sel)
    assert list(fig.layout.xaxis.ticktext) == ["pre[0]", "post[-1]", "mean resp"]
    assert "post_instruction[-1]" in fig.data[0].customdata[0][1] and "filtered out" in fig.data[0].customdata[0][1]
    assert len(fig.data[1].x) == 2 and len(fig.layout.shapes) == 1  # two filtered cells marked, the winner boxed
    with pytest.raises(ValueError, match="score must be"):
        plot.selection_heatmap_plotly(sel, "x")


def test_moe_interpretation_follows_the_numbers():
    def study(per_expert, non_expert):
        rates = {"baseline": 1.0, "combined_output": 0.97, "per_expert": per_expert, "non_expert": non_expert,
                 "random_control": 1.0}
        return {**{name: {"harmful": {"en": r, "zh": r}} for name, r in rates.items()},
                "kl_harmless": dict.fromkeys(rates, 0.1)}

    agrees = report.interpret_moe(study(0.0, 0.1))
    assert "agrees" in agrees and "0.10 with it removed from every weight but the routed experts'" in agrees
    assert "does not show it" in report.interpret_moe(study(0.1, 0.1))  # the experts' part adds nothing
    assert "does not show it" in report.interpret_moe(study(0.9, 1.0))  # not 0.1 below the combined-output edit
