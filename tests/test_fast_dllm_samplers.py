"""Fast-dLLM through `generate` (issue 12): KV caches, threshold / factor commits, hooks under caching.

Every `golden_fast_dllm` run (LLaDA gqa / mha, Dream) is reproduced token for token: output, the
canvas after every forward, the number of forwards, each forward's window (`hook.state.window`),
and the stored raw logits (atol 1e-4). Upstream's accidents are reproduced only with
`upstream_quirks=True`; `QUIRKS` lists the runs that need it and why, and the tests below pin what
the default (intended) semantics do instead.
"""

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens import hooks as H
from diffusion_lens.denoising import LLaDASampler, StreamingMean
from tests._fast_dllm import DUAL, FULL, PREFIX, read_runs
from tests.conftest import FIXTURES

FOLDERS = ["llada-tiny-gqa", "llada-tiny-mha", "dream-tiny"]
MODES = {"generate": None, "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}
QUIRKS = {
    "dual_thr_lo_fewsteps": "the dual cache's step cap leaves masks",
    "prefix_lowconf_sampled": "an extra Gumbel draw per prefix-cached step, thrown away",
    "prefix_entropy_onestep": "a forward computed at the end of each block and discarded",
}
RUNS = [(folder, name) for folder in FOLDERS for name in read_runs(FIXTURES / folder)]


@pytest.fixture(scope="module")
def models():
    return {folder: HookedDiffusionTransformer.from_pretrained(FIXTURES / folder) for folder in FOLDERS}


def options(run) -> dict:
    """generate's keywords for a golden run: upstream's own names, the sampler mapped onto kv_cache."""
    kwargs = dict(run.kwargs)
    sampler = kwargs.pop("sampler")
    kwargs.pop("seed", None)
    if run.family == "dream":
        if sampler.startswith("generation_utils_block"):
            kwargs["use_cache"] = True  # upstream's switch; dual_cache= is in the kwargs
    else:
        kwargs["kv_cache"] = MODES[sampler]
    return kwargs


def run_golden(model, run, **extra):
    if "seed" in run.kwargs:
        torch.manual_seed(run.kwargs["seed"])  # upstream draws from the global RNG
    kwargs = dict(options(run), upstream_quirks=run.name in QUIRKS, **extra)
    return model.generate(run.prompt, chat=False, progress=False, record=True, **kwargs)


@pytest.mark.parametrize("folder,name", RUNS)
def test_golden_run_token_exact(models, folder, name):
    run = read_runs(FIXTURES / folder)[name]
    out = run_golden(models[folder], run, capture_logits=sorted(run.logits))
    assert out.n_forwards == run.n_forwards
    assert torch.equal(out.trajectory, run.trajectory)  # the canvas after every forward
    assert torch.equal(out.sequences, run.output)
    kinds = [FULL if s.window is None else {"prefix": PREFIX, "dual": DUAL}[s.kv_cache] for s in out.states]
    assert kinds == run.forward_kind.tolist()
    for k, state in enumerate(out.states):
        assert (state.computed.start, state.computed.stop) == run.window(k)
    for k, expected in run.logits.items():  # raw, window-sized (Dream: unshifted)
        torch.testing.assert_close(out.logits[k], expected, atol=1e-4, rtol=0)


def test_quirk_runs_need_the_switch(models):
    """Without upstream_quirks the intended semantics apply, and the quirk runs differ as documented."""
    gqa, dream = read_runs(FIXTURES / "llada-tiny-gqa"), read_runs(FIXTURES / "dream-tiny")
    capped = gqa["dual_thr_lo_fewsteps"]
    out = models["llada-tiny-gqa"].generate(capped.prompt, chat=False, progress=False, **options(capped))
    assert (capped.output == capped.mask_id).any() and not (out.sequences == capped.mask_id).any()  # no cap
    onestep = dream["prefix_entropy_onestep"]
    out = models["dream-tiny"].generate(onestep.prompt, chat=False, progress=False, **options(onestep))
    assert torch.equal(out.sequences, onestep.output) and out.n_forwards == 2  # the discarded forwards skipped
    sampled = gqa["prefix_lowconf_sampled"]
    torch.manual_seed(sampled.kwargs["seed"])
    out = models["llada-tiny-gqa"].generate(sampled.prompt, chat=False, progress=False, **options(sampled))
    assert not torch.equal(out.sequences, sampled.output)  # one draw per forward: another sample


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refreshing_every_step_is_the_uncached_run(models, mode):
    run = read_runs(FIXTURES / "llada-tiny-gqa")["nocache_thr_lo"]
    kwargs = dict(options(run), kv_cache=mode, refresh=1)
    out = models["llada-tiny-gqa"].generate(run.prompt, chat=False, progress=False, record=True, **kwargs)
    assert torch.equal(out.trajectory, run.trajectory)
    assert all(state.builds_cache for state in out.states)


def _mask_loving_forward(mask_id, vocab):
    """A stand-in model whose best token is always the mask token (second best: token 5)."""
    def forward(state):
        rows, width = state.model_input.shape
        logits = torch.zeros(rows, width, vocab)
        logits[..., mask_id], logits[..., 5] = 3.0, 2.0
        return logits
    return forward


@pytest.mark.parametrize("rule", [dict(threshold=0.5), dict(factor=1.0), dict()])
def test_the_mask_token_is_never_proposed(models, rule):
    model = models["llada-tiny-gqa"]
    cfg, prompt = model.cfg, torch.tensor([[300, 118, 262]])
    forward = _mask_loving_forward(cfg.mask_token_id, cfg.d_vocab_out)
    sampler = LLaDASampler(steps=4, gen_length=8, block_length=4, kv_cache="prefix", **rule)
    *_, (_, canvas) = sampler.run(cfg, prompt, None, forward)
    assert (canvas[:, 3:] == 5).all()
    if rule:  # upstream would loop forever on this model: with the switch, an error says so
        quirky = LLaDASampler(steps=4, gen_length=8, block_length=4, kv_cache="prefix", upstream_quirks=True, **rule)
        with pytest.raises(RuntimeError, match="forever"):
            list(quirky.run(cfg, prompt, None, forward))


def test_hooks_see_the_computed_window(models):
    model, prompt = models["llada-tiny-gqa"], read_runs(FIXTURES / "llada-tiny-gqa")["dual_lowconf"].prompt
    seen = []

    def zero(act, hook):
        return act * 0

    def record(act, hook):
        seen.append((hook.state.computed, hook.state.cache_age, act.clone()))

    target = 7  # a column of denoising block 0 (prompt 6, blocks of 8)
    hooks = [H.at("blocks.0.hook_resid_post", zero, positions=[target]), ("blocks.0.hook_resid_post", record)]
    model.generate(prompt, hooks=hooks, kv_cache="dual", steps=8, gen_length=16, block_length=8, chat=False,
                   progress=False)
    assert len(seen) == 8
    for step, (cols, age, act) in enumerate(seen):
        assert act.shape[1] == cols.stop - cols.start
        assert age == (None if step % 4 == 0 else step % 4)
        inside = cols.start <= target < cols.stop
        assert inside == (step < 4 or step == 4)  # block 0's forwards and block 1's full forward
        if inside:
            assert (act[:, target - cols.start] == 0).all()
        assert (act.abs().sum(-1) > 0).sum() == act.shape[1] - inside


def test_a_hook_that_can_never_fire_is_refused(models):
    model, prompt = models["llada-tiny-gqa"], torch.tensor([[300, 118, 262, 143, 229, 235]])
    run = dict(kv_cache="prefix", steps=8, gen_length=16, block_length=8, chat=False, progress=False)
    never = H.at("blocks.0.hook_resid_post", lambda a, h: a, positions="prompt", steps=[1, 2, 3])
    with pytest.raises(ValueError, match="can never fire.*steps \\[0, 4\\]"):
        model.generate(prompt, hooks=[never], **run)
    fires = H.at("blocks.0.hook_resid_post", lambda a, h: a, positions="prompt", steps=[0, 1])
    model.generate(prompt, hooks=[fires], **run)
    uncached = dict(run, kv_cache=None)
    model.generate(prompt, hooks=[never], **uncached)  # every forward computes the prompt


def test_what_adaptive_and_cached_runs_refuse(models):
    model, prompt = models["llada-tiny-gqa"], torch.tensor([[300, 118, 262, 143, 229, 235]])
    run = dict(steps=16, gen_length=16, block_length=8, chat=False, progress=False)
    with pytest.raises(ValueError, match="counts from the end"):
        model.generate(prompt, cache=dict(names="hook_embed", steps=-1), threshold=0.5, **run)
    with pytest.raises(ValueError, match="counts from the end"):
        model.generate(prompt, reducers=[StreamingMean("hook_embed", steps=[0, -1])], threshold=0.5, **run)
    with pytest.raises(ValueError, match="counts from the end"):
        model.generate(prompt, hooks=[H.at("hook_embed", lambda a, h: a, steps=-1)], threshold=0.5, **run)
    with pytest.raises(ValueError, match="not reached"):
        model.generate(prompt, capture_logits=[15], threshold=0.01, **run)


@pytest.mark.parametrize("bad,match", [
    (dict(kv_cache="full"), "kv_cache='full'"),
    (dict(kv_cache="prefix", refresh=0), "refresh=0"),
    (dict(refresh=2), "needs kv_cache"),
    (dict(kv_cache="prefix", cfg_scale=1.0), "no guidance"),
    (dict(upstream_quirks=True), "upstream_quirks"),
    (dict(threshold=1.5), "threshold=1.5"),
    (dict(use_cache=False, dual_cache=True), "contradict"),
])
def test_bad_options_explain_themselves(models, bad, match):
    with pytest.raises(ValueError, match=match):
        models["llada-tiny-gqa"].generate(torch.tensor([[300, 118]]), steps=4, gen_length=8, block_length=4,
                                          chat=False, progress=False, **bad)


def test_replaying_a_cached_run(models):
    model, prompt = models["llada-tiny-gqa"], torch.tensor([[300, 118, 262, 143, 229, 235]])
    run = dict(kv_cache="prefix", steps=8, gen_length=16, block_length=8, chat=False, progress=False)
    recorded = model.generate(prompt, record=True, capture_logits=[1, 5], **run)
    replayed = model.generate(prompt, replay=recorded, capture_logits=[1, 5], chat=False, progress=False)
    for step in (1, 5):
        torch.testing.assert_close(replayed.logits[step], recorded.logits[step])


def test_padded_batches_under_a_kv_cache(models):
    """Pads stay masked in cached forwards (upstream crashes or attends them): LLaDA's cached run with a
    refresh every step is its uncached run, and a padded Dream row is that prompt generated alone."""
    tokens = torch.tensor([[0, 0, 65, 149, 131, 203], [65, 149, 131, 203, 211, 108]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    run = dict(steps=16, gen_length=16, block_length=8, chat=False, progress=False)
    llada = models["llada-tiny-gqa"]
    refreshed = llada.generate(tokens, attention_mask=mask, kv_cache="prefix", refresh=1, threshold=0.03, **run)
    uncached = llada.generate(tokens, attention_mask=mask, threshold=0.03, **run)
    assert torch.equal(refreshed.sequences, uncached.sequences)
    dream = models["dream-tiny"]
    for mode in ("prefix", "dual"):
        rule = dict(kv_cache=mode, alg="confidence_threshold", threshold=0.3, **run)
        batch = dream.generate(tokens, attention_mask=mask, **rule)
        alone = dream.generate(tokens[:1, 2:], **rule)
        assert torch.equal(batch.responses[0], alone.responses[0])


@pytest.mark.parametrize("folder", ["mmada-tiny", "llada-moe-tiny"])
def test_the_other_llada_family_samplers_take_the_kv_cache(folder):
    """MMaDA and LLaDA-MoE run Fast-dLLM's loop through LLaDASampler: a cached run refreshed at every
    step is their uncached run, and a dual-cached run computes one block per cached forward."""
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / folder)
    prompt = torch.arange(3, 9)[None]
    run = dict(steps=8, gen_length=16, block_length=8, factor=2.0, chat=False, progress=False)
    if model.cfg.mask_token_id is None:
        run["mask_id"] = 310  # the MoE fixture's config names no mask token
    refreshed = model.generate(prompt, kv_cache="prefix", refresh=1, **run)
    assert torch.equal(refreshed.sequences, model.generate(prompt, **run).sequences)
    dual = model.generate(prompt, kv_cache="dual", record=True, **run)
    assert {s.window for s in dual.states if s.is_cached_forward} <= {(6, 14), (14, 22)}


def test_step_caches_and_reducers_under_a_kv_cache_and_an_adaptive_rule_keep_what_each_forward_computed(models):
    """cache= / reducers= under kv_cache="prefix" and threshold=: each step holds the requested columns its
    forward computed (equal to a hook's reading), steps that never ran are absent, the mean is the readings'."""
    model, prompt = models["llada-tiny-gqa"], torch.tensor([[300, 118, 262, 143, 229, 235]])
    name, seen = "blocks.1.hook_resid_post", {}

    def read(act, hook):
        seen[hook.state.step] = (hook.state.computed, act.clone())

    mean = StreamingMean(name, positions="response")
    out = model.generate(prompt, hooks=[(name, read)], reducers=[mean], kv_cache="prefix", threshold=0.01, steps=16,
                         gen_length=16, block_length=8, chat=False, progress=False,
                         cache=dict(names=name, positions="response"))
    assert out.n_forwards < 16 and out.cache.steps == sorted(seen) and out.cache.n_steps is None
    readings = []
    for step, (cols, act) in seen.items():
        held = out.cache[step].positions
        assert held.tolist() == list(range(max(cols.start, 6), cols.stop))
        assert torch.equal(out.cache[step][name], act[:, held - cols.start])
        readings.append(act[0, held - cols.start])
    assert torch.allclose(mean.mean(name), torch.cat(readings).double().mean(0), atol=1e-10)
