"""Issue 13 (part 3): DiffusionGemma's entropy-bound block sampler through `generate`.

Every `golden_generate` run of both fixtures (tests/fixtures/README-diffusion-gemma.md), replayed
under its seed from the global RNG as upstream's, is token-exact: the sequences, the committed
(finalized) blocks, and per decoder step the noisy canvas the decoder read, the undecided
positions (the previous step's rejected ones), the re-noised canvas, the argmax (through the fed-back
self-conditioning logits) and where the rows' finished flags end each block. Batched, left-padded
runs are among them. The pure helpers (temperature, entropy, acceptance, stopping, finalization)
are checked against the reference's formulas.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.denoising.samplers import EntropyBoundSampler
from diffusion_lens.denoising.samplers.diffusion_gemma import (
    apply_logits_processors, categorical_entropy, entropy_bound_accept, entropy_bound_of, finalize_block,
    stable_and_confident, temperature,
)
from tests._diffusion_gemma import RUNS, entropy_bound_accept as reference_accept, planned_blocks, read_runs
from tests.conftest import FIXTURES

GEMMA = ["diffusion-gemma-tiny", "diffusion-gemma-tiny-dense"]


@pytest.fixture(scope="module", params=GEMMA)
def gemma(request):
    folder = FIXTURES / request.param
    return HookedDiffusionTransformer.from_pretrained(folder), read_runs(folder)


def _generate(model, run):
    """`run` through `model.generate` with its recorded kwargs unchanged (`sampler_config` included),
    seeded like upstream (global RNG), every state recorded."""
    torch.manual_seed(run.seed)
    return model.generate(run.prompt_ids, attention_mask=run.attention_mask, chat=False, progress=False,
                          record=True, **run.generate_kwargs())


@pytest.mark.parametrize("name", RUNS)
def test_every_golden_run_is_token_exact(gemma, name):
    model, golden = gemma
    run = golden.runs[name]
    out = _generate(model, run)
    assert out.sequences.equal(run.sequences)
    C = model.cfg.extra["canvas_length"]
    P = run.prompt_ids.shape[1]
    assert out.sequences[:, P:].equal(torch.cat(list(run.blocks), 1))
    assert run.n_blocks <= planned_blocks(run, C, P)

    encoder = [s for s in out.states if s.pass_name == "encoder"]
    decoder = [s for s in out.states if s.pass_name == "decoder"]
    assert [s.window for s in encoder] == [(0, P)] + [(P + k * C, P + (k + 1) * C) for k in range(run.n_blocks - 1)]
    assert len(decoder) == run.n_steps == len(out.states) - run.n_blocks == out.n_forwards - run.n_blocks
    trajectory = {s.step: canvas for s, canvas in zip(out.states, out.trajectory)}
    trace = run.trace
    for s, state in enumerate(decoder):
        block = int(trace.block[s])
        cols = slice(P + block * C, P + (block + 1) * C)
        assert state.block == block and state.window == (cols.start, cols.stop)
        assert state.model_input.equal(run.canvas_read(s)) and state.canvas[:, cols].equal(run.canvas_read(s))
        first = s == run.steps_of_block(block)[0]
        assert bool(trace.has_self_conditioning[s]) == (state.self_conditioning_logits is not None)
        undecided = torch.ones_like(trace.accepted_mask[s]) if first else ~trace.accepted_mask[s - 1]
        assert state.is_masked[:, cols].equal(undecided) and not state.is_masked[:, :cols.start].any()
        last = s == run.steps_of_block(block)[-1]
        ran = s - run.steps_of_block(block)[0] + 1
        assert last == (bool(trace.finished[s].all()) or ran == run.effective_config["max_denoising_steps"])
        if last:
            assert trajectory[state.step][:, cols].equal(run.blocks[block])
            continue
        moving = ~run.finished_before(s)  # rows stopped earlier keep their canvas
        assert trajectory[state.step][moving][:, cols].equal(trace.renoised[s][moving])
        assert decoder[s + 1].self_conditioning_logits.argmax(-1).equal(trace.argmax[s])


def test_the_adapter_reads_generation_config(gemma):
    model, golden = gemma
    sampler = model.adapter.sampler(model.cfg)
    config = golden.generation_config
    assert isinstance(sampler, EntropyBoundSampler) and sampler.canvas_length == model.cfg.extra["canvas_length"]
    assert (sampler.max_new_tokens, sampler.max_denoising_steps) == (config["max_new_tokens"], config["max_denoising_steps"])
    assert (sampler.eos_token_id, sampler.pad_token_id) == (config["eos_token_id"], config["pad_token_id"])
    assert sampler.entropy_bound == config["sampler_config"]["entropy_bound"]
    assert not sampler.fixed_steps() and sampler.n_steps() == sampler.n_blocks() * (sampler.max_denoising_steps + 1)
    bare = copy.copy(model.cfg)
    bare.extra = {"canvas_length": model.cfg.extra["canvas_length"]}  # a checkpoint without generation_config.json
    without = model.adapter.sampler(bare)
    assert (without.eos_token_id, without.pad_token_id, without.max_denoising_steps) == (None, None, 48)  # Q8


def test_hooks_see_encoder_and_decoder_steps(gemma):
    model, golden = gemma
    run = golden.runs["single_default"]
    seen = []
    model.generate(run.prompt_ids, chat=False, progress=False, max_new_tokens=run.kwargs["max_new_tokens"],
                   max_denoising_steps=2, hooks=[("blocks.0.hook_resid_post",
                                                  lambda act, hook: seen.append((hook.state.pass_name, act.shape[1])))])
    C, P = model.cfg.extra["canvas_length"], run.prompt_ids.shape[1]
    assert seen[:4] == [("encoder", P), ("decoder", C), ("decoder", C), ("encoder", C)]


def test_helpers_follow_the_reference():
    assert torch.allclose(temperature(12, 12, 0.4, 0.8), torch.tensor(0.8))
    assert temperature(1, 12, 0.4, 0.8) > 0.4  # never reaches t_min (Q5)
    logits = torch.randn(3, 5, 11)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert categorical_entropy(logits).equal(expected)
    entropy = torch.rand(4, 16)
    assert entropy_bound_accept(entropy, 0.3).equal(reference_accept(entropy, 0.3))
    assert entropy_bound_accept(entropy, 1e-9).sum(-1).eq(1).all()  # the lowest entropy is always accepted
    argmax = torch.tensor([[1, 2], [3, 4]])
    sharp = torch.nn.functional.one_hot(argmax, 6).float() * 100
    stop, history = stable_and_confident(argmax, sharp, None, 1, 0.005)
    assert not stop.any()
    stop, _ = stable_and_confident(argmax, sharp, history, 1, 0.005)
    assert stop.all()
    seq = torch.tensor([[9, 5, 7, 5, 3], [9, 4, 4, 4, 4]])
    padded, done = finalize_block(seq, torch.tensor([False, False]), 4, [7], 0, None)
    assert padded.tolist() == [[9, 5, 7, 0, 0], [9, 4, 4, 4, 4]] and done.tolist() == [True, False]
    padded, done = finalize_block(seq, torch.tensor([False, True]), 4, None, 0, 5)
    assert padded.tolist() == [[9, 5, 7, 5, 3], [9, 0, 0, 0, 0]] and done.all()


def test_bad_options_say_what_is_wrong():
    with pytest.raises(ValueError, match="t_max > t_min|0 <= t_min < t_max"):
        EntropyBoundSampler(t_min=0.5, t_max=0.4)
    with pytest.raises(ValueError, match="max_denoising_steps=0 must be a positive int"):
        EntropyBoundSampler(max_denoising_steps=0)
    with pytest.raises(TypeError, match="has no option 'top_k'.*TopKLogitsWarper"):
        EntropyBoundSampler().with_options(top_k=5)


# ---------------------------------------------------------------- upstream's generate() keywords (item 3)
PROMPT = torch.tensor([[2, 10, 11, 12, 13]])


@pytest.mark.parametrize("name, advice", [("temperature", "t_min= / t_max="), ("do_sample", "t_min= / t_max="),
                                          ("top_k", "TopKLogitsWarper"), ("top_p", "TopPLogitsWarper"),
                                          ("streamer", "not supported"), ("pixel_values", "only the text path")])
def test_keywords_upstream_ignores_raise_with_what_to_use(gemma, name, advice):
    """Upstream's generate() swallows temperature= / top_k= / top_p= / do_sample= (same tokens): never silent here;
    images (upstream's pixel_values=) are refused with the reason: the vision tower is carried, not run."""
    model, _ = gemma
    with pytest.raises(TypeError, match=f"EntropyBoundSampler has no option '{name}': .*{advice}"):
        model.generate(PROMPT, chat=False, progress=False, **{name: 0.5})


def test_sampler_config_as_upstream_passes_it(gemma):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig  # upstream's class

    model, _ = gemma
    sampler = model.adapter.sampler(model.cfg)
    for given in (EntropyBoundSamplerConfig(entropy_bound=0.3), {"entropy_bound": 0.3},
                  {"entropy_bound": 0.3, "_cls_name": "EntropyBoundSamplerConfig"}):
        assert sampler.with_options(sampler_config=given).entropy_bound == 0.3
    assert sampler.with_options(sampler_config={"entropy_bound": 0.3}, entropy_bound=0.3).entropy_bound == 0.3
    with pytest.raises(ValueError, match="entropy_bound=0.2 and sampler_config's entropy_bound=0.3 disagree"):
        sampler.with_options(sampler_config={"entropy_bound": 0.3}, entropy_bound=0.2)
    for wrong in (0.3, {"entropy_bound": 0.3, "top_k": 2}, {"_cls_name": "Other", "entropy_bound": 0.3}):
        with pytest.raises(ValueError, match="is not an entropy-bound sampler config; pass transformers' "
                                             "EntropyBoundSamplerConfig"):
            sampler.with_options(sampler_config=wrong)
    assert entropy_bound_of({"entropy_bound": 0.2}) == 0.2
    torch.manual_seed(1)
    configured = model.generate(PROMPT, chat=False, progress=False, max_denoising_steps=3,
                                sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.7)).sequences
    torch.manual_seed(1)
    direct = model.generate(PROMPT, chat=False, progress=False, max_denoising_steps=3, entropy_bound=0.7).sequences
    assert configured.equal(direct)


def test_validation_matches_upstream():
    """Upstream's config refuses an int entropy bound / confidence threshold (`must be a float > 0`): so do we."""
    for name, value in (("entropy_bound", 1), ("entropy_bound", -0.1), ("confidence_threshold", 1),
                        ("confidence_threshold", 0.0)):
        with pytest.raises(ValueError, match=f"{name}={value!r} must be a float > 0"):
            EntropyBoundSampler(**{name: value})
    with pytest.raises(ValueError, match="max_length=0 must be a positive int"):
        EntropyBoundSampler(max_length=0)
    with pytest.raises(ValueError, match="wrap it in"):
        EntropyBoundSampler(logits_processor=lambda ids, scores: scores)
    with pytest.raises(ValueError, match="must be a list of callables"):
        EntropyBoundSampler(logits_processor=[3])
    with pytest.raises(ValueError, match="stopping_criteria=.* wrap it in"):
        EntropyBoundSampler(stopping_criteria=lambda ids, scores, **kwargs: ids[:, 0] > 0)


class _LastTokenBias:
    """A processor that reads all three of upstream's arguments: favours each row's last committed token,
    more at early steps (large cur_step), and records what it was called with."""

    def __init__(self, n_steps: int):
        self.n_steps, self.calls = n_steps, []

    def __call__(self, input_ids, scores, cur_step):
        self.calls.append((tuple(input_ids.shape), int(cur_step), cur_step.dtype))
        bias = torch.zeros_like(scores).scatter(-1, input_ids[:, -1:, None].expand(-1, scores.shape[1], 1), 3.0)
        return scores + bias * cur_step / self.n_steps


def test_logits_processors_match_transformers_generate():
    """The same processors (a transformers `LogitsProcessorList`: TopK, then one taking cur_step) under the
    same seed on the fixture's weights: transformers' own `generate` and ours give identical tokens, and
    the processors see the same input_ids shapes and cur_step values (int32, N..1)."""
    from transformers import DiffusionGemmaForBlockDiffusion, LogitsProcessorList, TopKLogitsWarper  # the live reference

    folder = FIXTURES / GEMMA[0]
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
    model = HookedDiffusionTransformer.from_pretrained(folder)
    prompt = torch.tensor([[2, 10, 11, 12, 13], [0, 2, 30, 31, 32]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    options = dict(max_new_tokens=32, max_denoising_steps=6)
    theirs_bias, ours_bias = _LastTokenBias(6), _LastTokenBias(6)
    torch.manual_seed(5)
    theirs = reference.generate(prompt, attention_mask=mask, **options,
                                logits_processor=LogitsProcessorList([TopKLogitsWarper(7), theirs_bias])).sequences
    torch.manual_seed(5)
    ours = model.generate(prompt, attention_mask=mask, chat=False, progress=False, **options,
                          logits_processor=LogitsProcessorList([TopKLogitsWarper(7), ours_bias])).sequences
    assert ours.equal(theirs)
    assert ours_bias.calls == theirs_bias.calls and ours_bias.calls[0] == ((2, 5), 6, torch.int32)
    torch.manual_seed(5)
    plain = model.generate(prompt, attention_mask=mask, chat=False, progress=False, **options).sequences
    assert not plain.equal(ours)  # the processors changed the run


def test_apply_logits_processors_calls_as_transformers_does():
    ids, scores, step = torch.tensor([[4, 1]]), torch.zeros(1, 3, 6), torch.tensor(2, dtype=torch.int32)
    ban_1 = lambda input_ids, s: s.index_fill(-1, input_ids[:, -1], -float("inf"))  # noqa: E731
    scale = lambda input_ids, s, cur_step: s + cur_step  # noqa: E731
    out = apply_logits_processors([scale, ban_1], ids, scores, step)
    assert out[..., 1].isinf().all() and out[..., 0].eq(2).all()


class _FirstRowAfterOneBlock:
    """Upstream's custom stopping criterion: row 0 is done once a block is committed, row 1 never;
    records what it was called with."""

    def __init__(self, prompt_width: int):
        self.prompt_width, self.calls = prompt_width, []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append((tuple(input_ids.shape), scores, kwargs))
        return torch.tensor([input_ids.shape[1] > self.prompt_width, False])


def test_stopping_criteria_match_transformers_generate():
    """A custom criterion stops row 0 after its first block: transformers' `generate` and ours pad its
    later blocks identically, call the criterion with the same arguments, and differ from a run without it."""
    from transformers import DiffusionGemmaForBlockDiffusion, StoppingCriteriaList  # the live reference

    folder = FIXTURES / GEMMA[0]
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
    model = HookedDiffusionTransformer.from_pretrained(folder)
    prompt = torch.tensor([[2, 10, 11, 12, 13], [2, 30, 31, 32, 33]])
    options = dict(max_new_tokens=48, max_denoising_steps=4)
    theirs_stop, ours_stop = _FirstRowAfterOneBlock(5), _FirstRowAfterOneBlock(5)
    torch.manual_seed(3)
    theirs = reference.generate(prompt, stopping_criteria=StoppingCriteriaList([theirs_stop]), **options).sequences
    torch.manual_seed(3)
    ours = model.generate(prompt, chat=False, progress=False, stopping_criteria=StoppingCriteriaList([ours_stop]),
                          **options).sequences
    assert ours.equal(theirs) and ours_stop.calls == theirs_stop.calls
    C = model.cfg.extra["canvas_length"]
    assert ours[0, 5 + C:].eq(model.adapter.sampler(model.cfg).pad_token_id).all() and ours.shape[1] == 5 + 3 * C
    torch.manual_seed(3)
    plain = model.generate(prompt, chat=False, progress=False, **options).sequences
    assert plain[:, :5 + C].equal(ours[:, :5 + C]) and not plain[0].equal(ours[0]) and plain[1].equal(ours[1])
