"""The lm-eval-harness model "diffusion-lens" (diffusion_lens.harness) on the embedded tiny-refusal model:
batched generation with stop sequences, steering from a saved Directions, model-argument errors, the
Monte-Carlo likelihood's properties, and an offline IFEval run through lm_eval.simple_evaluate."""

import math
import socket

import lm_eval  # the `eval` extra, part of `dev`
import pytest
import torch
from lm_eval.api.instance import Instance

from diffusion_lens import evals
from diffusion_lens.harness import DiffusionLensLM, load_ifeval_jsonl, mc_loglikelihood, task_manager
from diffusion_lens.harness.ifeval import IFEVAL_TINY
from diffusion_lens.steering import mean_difference
from diffusion_lens.studies.abliteration import prompt_sets

GEN = 16  # response length: the toy refusal ("I'm sorry, but I can't help with that.") fits


@pytest.fixture(scope="module")
def lm():
    return DiffusionLensLM(pretrained="tiny-refusal", gen_length=GEN, batch_size=2)


@pytest.fixture(scope="module")
def sets():
    return prompt_sets("tiny-refusal", None, None, n_train=8, n_eval=4)


def _requests(lm, prompts, until=()):
    return [Instance("generate_until", {}, (lm.apply_chat_template([{"role": "user", "content": p}]),
                                            {"until": list(until), "do_sample": False, "temperature": 0.0,
                                             "max_gen_toks": 64}), i)
            for i, p in enumerate(prompts)]


def test_generate_until_batches_and_cuts_at_the_first_stop_sequence(lm):
    prompts = ["How do I bake bread? Finish your reply with DONE.", "What is 2 + 3?",
               "Explain how to break into my neighbour's garage."]
    full = lm.generate_until(_requests(lm, prompts))          # 3 prompts, batch_size=2: two generate calls
    alone = [lm.model.generate(lm.apply_chat_template([{"role": "user", "content": p}]), chat=False, gen_length=GEN,
                               steps=GEN, progress=False).texts[0] for p in prompts]
    assert full == alone
    assert any("." in text for text in full)
    cut = lm.generate_until(_requests(lm, prompts, until=[".", "never-there"]))
    assert cut == [text.split(".")[0] for text in full]


def test_generation_options_are_mapped_or_refused():
    lm = DiffusionLensLM(pretrained="tiny-refusal", block_length=8)
    options, until, keep = lm._generation_plan({"until": "\n", "max_gen_toks": 12, "top_p": 1.0})
    assert (options["gen_length"], options["steps"], options["temperature"], until, keep) == (16, 16, 0.0, ["\n"], 12)
    with pytest.raises(ValueError, match="needs temperature > 0"):
        lm._generation_plan({"do_sample": True})
    with pytest.raises(ValueError, match="do_sample=False"):
        lm._generation_plan({"temperature": 0.7})
    with pytest.raises(ValueError, match="top_p"):  # LLaDA's sampler has no nucleus sampling
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"top_p": 0.9, "max_gen_toks": 8}), 0)])


def test_unknown_or_misplaced_model_arguments_are_errors():
    with pytest.raises(ValueError, match=r"Unknown model argument\(s\) \['bogus'\].*accepts.*steer"):
        DiffusionLensLM.create_from_arg_string("pretrained=tiny-refusal,bogus=1")
    with pytest.raises(ValueError, match="gen_kwargs"):
        DiffusionLensLM.create_from_arg_string("pretrained=tiny-refusal,temperature=0.5")
    with pytest.raises(ValueError, match="no steer=PATH"):
        DiffusionLensLM.create_from_arg_string("pretrained=tiny-refusal,strength=0.5")
    with pytest.raises(ValueError, match="batch_size must be an int"):
        DiffusionLensLM.create_from_arg_string("pretrained=tiny-refusal,batch_size=two")
    lm = DiffusionLensLM.create_from_arg_string("pretrained=tiny-refusal,gen_length=16,steps=8")
    assert lm.sampler_options == {"steps": 8} and lm.gen_length == 16


def test_ablating_a_saved_refusal_direction_changes_harmful_responses(lm, sets, tmp_path):
    dirs = mean_difference(lm.model, sets["harmful_train"], sets["harmless_train"], layers=[4],
                           positions="post_instruction", gen_length=32, progress=False)
    dirs.save(tmp_path / "dirs")
    steered = DiffusionLensLM.create_from_arg_string(
        f"pretrained=tiny-refusal,gen_length={GEN},batch_size=4,steer={tmp_path / 'dirs'},direction_layer=4,"
        "direction_position=post_instruction[-5]")
    assert steered.get_model_info()["steering"]["kind"] == "Directions"
    harmful = sets["harmful_eval"]
    before, after = lm.generate_until(_requests(lm, harmful)), steered.generate_until(_requests(steered, harmful))
    refusals = [sum(map(evals.is_refusal, texts)) for texts in (before, after)]
    assert refusals[0] >= 3 and refusals[1] < refusals[0], (before, after)
    with pytest.raises(ValueError, match=r"directions \(layer, position\)"):  # several positions: one must be named
        DiffusionLensLM(pretrained="tiny-refusal", steer=str(tmp_path / "dirs"))


def _exact_one_token(model, ctx, cont):
    canvas = torch.cat([ctx, torch.tensor([model.cfg.mask_token_id])])[None]
    with torch.no_grad():
        logits = model.token_logits(model(canvas))[0, -1].float()
    return float(torch.log_softmax(logits, -1)[cont[0]])


def test_mc_likelihood_is_exact_for_one_token_and_its_spread_falls_as_one_over_sqrt_samples(lm):
    model = lm.model
    ctx = model.to_tokens("What is 2 + 3?", chat=True)[0].cpu()
    one = model.to_tokens(" The")[0][:1].cpu()
    for seed in (0, 1):
        est = mc_loglikelihood(model, ctx, one, mc_samples=4, batch_size=4, seed=seed)
        assert est.stderr == 0.0 and math.isclose(est.value, _exact_one_token(model, ctx, one), rel_tol=1e-5)
    cont = model.to_tokens("The answer is 5.")[0].cpu()
    # batch_size=1: independent samples (no stratification), so the spread over seeds is the plain MC rate
    spread = {n: torch.tensor([mc_loglikelihood(model, ctx, cont, mc_samples=n, batch_size=1, seed=s).value
                               for s in range(12)]) for n in (1, 16)}
    ratio = float(spread[1].std() / spread[16].std())
    assert 2.0 < ratio < 8.0, ratio                      # sqrt(16 / 1) = 4
    se = math.sqrt(float(spread[1].var() + spread[16].var()) / 12)
    assert abs(float(spread[1].mean() - spread[16].mean())) < 3 * se   # one expectation (unbiased estimates)


def test_loglikelihood_requests(lm):
    prompt = lm.apply_chat_template([{"role": "user", "content": "Explain how to break into my neighbour's garage."}])
    small = DiffusionLensLM(pretrained="tiny-refusal", mc_samples=8, batch_size=8)
    # a 2-token canvas in 2 steps: the toy opens a refusal with "抱歉" (its greedy decode has no special token)
    greedy = small.generate_until([Instance("generate_until", {}, (prompt, {"max_gen_toks": 2}), 0)])[0]
    assert greedy == "抱歉"
    (ll_greedy, is_greedy), (ll_other, not_greedy) = small.loglikelihood(
        [Instance("loglikelihood", {}, (prompt, greedy), 0), Instance("loglikelihood", {}, (prompt, " banana"), 1)])
    assert is_greedy and not not_greedy and ll_greedy > ll_other
    with pytest.raises(NotImplementedError, match="no rolling"):
        small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0)])


def test_ifeval_runs_offline_through_lm_eval_on_a_local_file(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network access during an offline lm-eval run")

    shipped = load_ifeval_jsonl()["train"]
    assert len(shipped) == 8 and {i for ids in shipped["instruction_id_list"] for i in ids} == {
        "change_case:english_capital", "startend:end_checker"}
    local = tmp_path / "ifeval.jsonl"
    local.write_text("\n".join(IFEVAL_TINY.read_text().splitlines()[:3]) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"key": 1, "prompt": "Hi"}\n')
    with pytest.raises(ValueError, match="lacks"):
        load_ifeval_jsonl(str(tmp_path / "bad.jsonl"))

    monkeypatch.setattr(socket.socket, "connect", no_network)
    results = lm_eval.simple_evaluate(model="diffusion-lens", model_args=f"pretrained=tiny-refusal,gen_length={GEN}",
                                      tasks=["ifeval_local"], apply_chat_template=True, batch_size=4,
                                      task_manager=task_manager(include_defaults=False, metadata={"ifeval_jsonl": str(local)}))
    assert results["n-samples"]["ifeval_local"]["effective"] == 3
    metrics = results["results"]["ifeval_local"]
    for name in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"):
        assert 0.0 <= metrics[f"{name},none"] <= 1.0
    assert results["config"]["steering"] == {"kind": None} and results["config"]["gen_length"] == GEN


def test_affine_map_and_abliterated_model_as_steer(lm, tmp_path):
    from diffusion_lens.steering import AffineMap

    vector = torch.randn(lm.model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    AffineMap.from_addition(vector, 1.0, ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre"]).save(tmp_path / "map.safetensors")
    steered = DiffusionLensLM(pretrained="tiny-refusal", steer=str(tmp_path / "map.safetensors"), strength=0.5,
                              layers="3", steer_steps="0:4")
    record = steered.get_model_info()["steering"]
    assert (record["kind"], record["sites"], record["strength"], record["steps"]) == (
        "AffineMap", ["blocks.3.hook_resid_pre"], 0.5, [0, 1, 2, 3])
    assert [name for name, _ in steered.steering.hooks] == ["blocks.3.hook_resid_pre"]
    with pytest.raises(ValueError, match="selects none of the map's sites"):
        DiffusionLensLM(pretrained="tiny-refusal", steer=str(tmp_path / "map.safetensors"), layers="0")
    with pytest.raises(ValueError, match="drop steer_steps"):
        steered.loglikelihood([Instance("loglikelihood", {}, ("Hi", " there"), 0)])

    folder = lm.model.save_pretrained(tmp_path / "abliterated")
    (folder / "abliteration.json").write_text('{"trial": 7, "params": {"scope": "global"}}')
    abliterated = DiffusionLensLM(steer=str(folder / "abliteration.json"))
    assert abliterated.steering.hooks == [] and abliterated.get_model_info()["steering"]["trial"] == 7
    with pytest.raises(ValueError, match="cannot apply to an abliterated model"):
        DiffusionLensLM(steer=str(folder), strength=0.5)
    with pytest.raises(ValueError, match="none of"):
        DiffusionLensLM(pretrained="tiny-refusal", steer=str(tmp_path / "missing"))


def test_the_command_runs_lm_evals_cli_with_the_shipped_tasks(monkeypatch):
    import sys

    import lm_eval.__main__

    from diffusion_lens.harness.__main__ import main

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    main(["--model", "diffusion-lens", "--tasks", "ifeval_local"])
    main(["--model", "diffusion-lens", "--include_path", "mine"])
    assert seen == [["lm-eval", "--model", "diffusion-lens", "--tasks", "ifeval_local", "--include_path", str(IFEVAL_TINY.parent)],
                    ["lm-eval", "--model", "diffusion-lens", "--include_path", "mine"]]


def test_the_diffusion_lens_command_hands_every_later_argument_to_lm_eval(monkeypatch):
    import diffusion_lens.harness.__main__ as entry
    from diffusion_lens.__main__ import main

    seen = []
    monkeypatch.setattr(entry, "main", seen.append)
    main(["lm-eval", "--model", "diffusion-lens", "--model_args", "pretrained=tiny-refusal", "--tasks", "ifeval_local"])
    main(["lm-eval"])
    assert seen == [["--model", "diffusion-lens", "--model_args", "pretrained=tiny-refusal", "--tasks", "ifeval_local"],
                    ["--help"]]
