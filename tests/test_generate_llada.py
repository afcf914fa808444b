"""Issue 3: the LLaDA reference sampler through `model.generate`: token-exact parity with every
upstream `golden_generate` run (outputs and the canvas after every step), seeding, the driver's
input handling, and clean-up after errors."""

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens import hooks as H
from diffusion_lens.denoising import DenoisingState, LLaDASampler
from tests._denoising import LLADA_FIXTURES, RUNS, all_states_none, golden_run, load_model, no_hooks_left
from tests.conftest import FIXTURES


def run_golden(model, golden, **extra):
    return model.generate(
        golden["prompt"], attention_mask=golden["attention_mask"], seed=golden["seed"],
        mask_id=golden["mask_id"], progress=False, **golden["kwargs"], **extra,
    )


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", LLADA_FIXTURES)
def test_golden_parity_outputs_and_trajectory(name, run):
    model, golden = load_model(name), golden_run(name, run)
    out = run_golden(model, golden)
    assert torch.equal(out.sequences, golden["output"])
    assert out.trajectory.shape == golden["trajectory"].shape
    for step, (ours, theirs) in enumerate(zip(out.trajectory, golden["trajectory"])):
        assert torch.equal(ours, theirs), f"canvas after step {step} differs"
    assert out.texts is None  # the fixtures ship no tokenizer
    assert out.response_start == golden["prompt"].shape[1]


@pytest.mark.parametrize("name", LLADA_FIXTURES)
def test_global_rng_matches_upstream_seeding(name):
    """Upstream seeds with torch.manual_seed right before the run and draws from the global RNG."""
    model, golden = load_model(name), golden_run(name, "gen_sampled")
    torch.manual_seed(golden["seed"])
    out = model.generate(golden["prompt"], mask_id=golden["mask_id"], progress=False, **golden["kwargs"])
    assert torch.equal(out.sequences, golden["output"])


def test_seed_determinism_and_generator():
    model, golden = load_model("llada-tiny-mha"), golden_run("llada-tiny-mha", "gen_sampled")
    kwargs = dict(progress=False, steps=8, gen_length=16, block_length=8, temperature=0.9)
    first = model.generate(golden["prompt"], seed=7, **kwargs).sequences
    again = model.generate(golden["prompt"], seed=7, **kwargs).sequences
    other = model.generate(golden["prompt"], seed=8, **kwargs).sequences
    from_generator = model.generate(golden["prompt"], generator=torch.Generator().manual_seed(7), **kwargs).sequences
    assert torch.equal(first, again) and torch.equal(first, from_generator)
    assert not torch.equal(first, other)


def test_temperature_zero_ignores_seed():
    model, golden = load_model("llada-tiny-gqa"), golden_run("llada-tiny-gqa", "gen_semi_ar")
    a = model.generate(golden["prompt"], seed=1, progress=False, **golden["kwargs"]).sequences
    b = model.generate(golden["prompt"], seed=2, progress=False, **golden["kwargs"]).sequences
    assert torch.equal(a, b) and torch.equal(a, golden["output"])


@pytest.mark.parametrize("name", LLADA_FIXTURES)
def test_eos_eot_option_both(name):
    """At temperature 0 upstream already suppresses both ids (aliasing), so 'both' is identical;
    at temperature > 0 upstream suppresses only EoT, and 'both' changes the run."""
    model = load_model(name)
    golden = golden_run(name, "gen_conf_eos_eot_inf")
    assert torch.equal(run_golden(model, golden, eos_eot_confidence="both").sequences, golden["output"])
    sampled = golden_run(name, "gen_conf_eos_eot_inf_sampled")
    assert torch.equal(run_golden(model, sampled).sequences, sampled["output"])
    # Make "EOS" the token the model samples most, so that suppressing it must change the order.
    frequent = int(sampled["output"][:, 6:].flatten().mode().values)
    kwargs = {**sampled["kwargs"], "eos_id": frequent}
    upstream = model.generate(sampled["prompt"], seed=sampled["seed"], progress=False, **kwargs)
    fixed = model.generate(sampled["prompt"], seed=sampled["seed"], progress=False, eos_eot_confidence="both", **kwargs)
    assert not torch.equal(fixed.trajectory, upstream.trajectory)


def test_eos_eot_ids_default_to_config():
    model = load_model("llada-tiny-mha")
    golden = golden_run("llada-tiny-mha", "gen_logits_eos_inf")
    kwargs = {k: v for k, v in golden["kwargs"].items() if k not in ("eos_id", "eot_id")}
    saved = model.cfg.eos_token_id
    try:
        model.cfg.eos_token_id = golden["kwargs"]["eos_id"]
        out = model.generate(golden["prompt"], progress=False, **kwargs)
    finally:
        model.cfg.eos_token_id = saved
    assert torch.equal(out.sequences, golden["output"])
    with pytest.raises(ValueError, match="eot_id"):  # the fixture config has no EoT id
        model.generate(golden["prompt"], progress=False, steps=8, gen_length=16, block_length=8,
                       confidence_eos_eot_inf=True)


def test_sampler_options_are_validated():
    model, golden = load_model("llada-tiny-mha"), golden_run("llada-tiny-mha", "gen_semi_ar")
    with pytest.raises(ValueError, match="multiple of block_length"):
        model.generate(golden["prompt"], gen_length=16, block_length=5, steps=8, progress=False)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        model.generate(golden["prompt"], gen_length=16, block_length=8, steps=3, progress=False)
    with pytest.raises(TypeError, match="no option 'step_count'"):
        model.generate(golden["prompt"], step_count=3, progress=False)
    with pytest.raises(ValueError, match="remasking"):
        LLaDASampler(remasking="entropy")


def test_explicit_sampler_and_adapterless_model():
    model, golden = load_model("llada-tiny-mha"), golden_run("llada-tiny-mha", "gen_semi_ar")
    sampler = LLaDASampler(**golden["kwargs"])
    assert torch.equal(model.generate(golden["prompt"], sampler=sampler, progress=False).sequences, golden["output"])
    bare = HookedDiffusionTransformer(model.cfg)
    bare.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="no adapter"):
        bare.generate(golden["prompt"], progress=False)
    assert torch.equal(bare.generate(golden["prompt"], sampler=sampler, progress=False).sequences, golden["output"])


def test_hook_state_is_none_outside_generation():
    model, golden = load_model("llada-tiny-gqa"), golden_run("llada-tiny-gqa", "gen_semi_ar")
    assert all_states_none(model)
    seen = []
    model.run_with_hooks(golden["prompt"], fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.append(hook.state))])
    assert seen == [None]
    states = []
    model.generate(golden["prompt"], hooks=[("hook_embed", lambda x, hook: states.append(hook.state))],
                   progress=False, **golden["kwargs"])
    assert [s.step for s in states] == list(range(8))
    assert all(isinstance(s, DenoisingState) for s in states)
    assert [(s.block, s.step_in_block) for s in states] == [(b, i) for b in range(2) for i in range(4)]
    assert all_states_none(model)


class Boom(RuntimeError):
    pass


def test_exception_in_hook_leaves_model_clean():
    model, golden = load_model("llada-tiny-mha"), golden_run("llada-tiny-mha", "gen_padded")

    def explode(act, hook):
        if hook.state.step == 3:
            raise Boom("mid-generation")

    hooks = [H.at("blocks.1.hook_resid_post", explode), ("blocks.0.attn.hook_pattern", lambda x, hook: None)]
    with pytest.raises(Boom):
        model.generate(golden["prompt"], attention_mask=golden["attention_mask"], hooks=hooks,
                       cache=dict(names=["blocks.0.hook_resid_post"], steps=[3]), progress=False,
                       **golden["kwargs"])
    assert no_hooks_left(model)
    assert model.list_hooks() == {}
    assert all_states_none(model)
    after = model.generate(golden["prompt"], attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    fresh = load_model.__wrapped__("llada-tiny-mha").generate(
        golden["prompt"], attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    assert torch.equal(after.sequences, fresh.sequences)
    assert torch.equal(after.sequences, golden["output"])


def test_token_input_shapes_and_return_trajectory_off():
    model, golden = load_model("llada-tiny-gqa"), golden_run("llada-tiny-gqa", "gen_semi_ar")
    one = model.generate(golden["prompt"][0], return_trajectory=False, progress=False, **golden["kwargs"])
    assert one.trajectory is None
    assert torch.equal(one.sequences, golden["output"][:1])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(golden["prompt"], attention_mask=torch.ones(2, 3, dtype=torch.long), progress=False)


def _word_tokenizer(folder=None):
    """A word-level tokenizer on the tiny vocab with LLaDA's special-token layout and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(300)}
    vocab.update({"<|startoftext|>": 300, "<|endoftext|>": 301, "<|start_header_id|>": 302, "<|eot_id|>": 303,
                  "<|end_header_id|>": 304, "user": 305, "assistant": 306, "<|mdm_mask|>": 310})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|mdm_mask|>"],
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
        "{{ m['content'] }} <|eot_id|> {% endfor %}<|start_header_id|> assistant <|end_header_id|>"
    )
    return tokenizer


def test_text_inputs_chat_padding_and_texts(tmp_path):
    import shutil

    folder = tmp_path / "llada-tiny-tok"
    shutil.copytree(FIXTURES / "llada-tiny-mha", folder)
    _word_tokenizer().save_pretrained(str(folder))
    model = HookedDiffusionTransformer.from_pretrained(folder)
    assert model.cfg.eot_token_id == 303  # set by the adapter from the tokenizer's <|eot_id|>

    kwargs = dict(steps=4, gen_length=8, block_length=4, progress=False)
    out = model.generate(["w1 w2 w3", "w4"], **kwargs)
    tokens, mask = model.to_tokens(["w1 w2 w3", "w4"], chat=True, return_attention_mask=True)
    assert out.response_start == tokens.shape[1]
    assert torch.equal(out.attention_mask[:, : tokens.shape[1]], mask)
    assert (mask[1] == 0).sum() == 2  # left padding of the shorter prompt
    same = model.generate(tokens, attention_mask=mask, **kwargs)
    assert torch.equal(out.sequences, same.sequences)
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.texts == model.to_string(out.sequences[:, tokens.shape[1]:], skip_special_tokens=True)
    plain = model.generate("w1 w2", chat=False, **kwargs)
    assert plain.response_start == 2
    with pytest.raises(ValueError, match="only with token ids"):
        model.generate("w1", attention_mask=torch.ones(1, 1), **kwargs)
