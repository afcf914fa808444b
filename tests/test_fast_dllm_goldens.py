"""The Fast-dLLM golden runs (issue 12) as recorded, and what the uncached core already reproduces.

Issue 12 adds the cached samplers that must reproduce every run token for token. Until then these
tests pin (1) the files' own invariants, so that a damaged copy is caught here and not mistaken for
a sampler bug, and (2) every stored full-canvas forward (`forward_kind` 0, the forward that builds
the cache): our plain forward on the canvas it read gives upstream's raw logits at atol 1e-4.
"""

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.kv_cache import KVCache
from tests._fast_dllm import FULL, read_runs
from tests.conftest import FIXTURES

FOLDERS = ["llada-tiny-gqa", "llada-tiny-mha", "dream-tiny"]


@pytest.fixture(scope="module", params=FOLDERS)
def folder(request):
    return request.param


def test_runs_are_consistent(folder):
    runs = read_runs(FIXTURES / folder)
    assert len(runs) == {"dream-tiny": 14}.get(folder, 21)
    for run in runs.values():
        n, width = run.n_forwards, run.prompt.shape[1]
        assert run.trajectory.shape[0] == n and torch.equal(run.trajectory[-1], run.output), run.name
        assert torch.equal(run.output[:, :width], run.prompt), run.name  # the prompt never changes
        assert run.forward_kind[0] == FULL, run.name  # every run opens with a full forward
        for k in range(n):
            start, stop = run.window(k)
            assert 0 <= start < stop <= run.output.shape[1], (run.name, k)
            if run.forward_kind[k] == FULL:
                assert (start, stop) == (0, run.output.shape[1]), (run.name, k)
            if k in run.logits:
                assert run.logits[k].shape[:2] == (run.prompt.shape[0], stop - start), (run.name, k)
        # a forward commits tokens but never takes one back (masked diffusion)
        before = torch.stack([run.canvas_before(k) for k in range(n)])
        committed = before != run.mask_id
        assert (run.trajectory == before)[committed].all(), run.name


def test_full_forwards_match_upstream_logits(folder):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / folder)
    checked = 0
    for run in read_runs(FIXTURES / folder).values():
        for k, expected in run.logits.items():
            if run.forward_kind[k] != FULL:
                continue  # cached forwards: issue 12
            with torch.no_grad():  # no attention mask: Fast-dLLM's samplers pass none
                logits = model(run.canvas_before(k))
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
            checked += 1
    assert checked >= 4  # two runs with stored logits, one full forward per block (2 blocks)


def test_cached_forwards_match_upstream_logits(folder):
    """Every stored prefix- and dual-cached forward: the cache is built by the block's full forward
    on the canvas it read, then our windowed forward on the recorded window gives upstream's raw
    logits (LLaDA: prefix = block start to the end, dual = the block; Dream likewise, unshifted)."""
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / folder)
    checked = 0
    for run in read_runs(FIXTURES / folder).values():
        for k, expected in run.logits.items():
            if run.forward_kind[k] == FULL:
                continue
            opened = max(j for j in range(k) if run.forward_kind[j] == FULL and run.block[j] == run.block[k])
            canvas = run.canvas_before(k)
            cache = KVCache.empty(model.cfg, batch=canvas.shape[0], n_pos=canvas.shape[1], like=model.W_E)
            start, stop = run.window(k)
            with torch.no_grad():
                model(run.canvas_before(opened), kv_cache=cache)
                logits = model(canvas[:, start:stop], kv_cache=cache, window_start=start)
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
            checked += 1
    assert checked >= 10


def test_a_window_covering_the_canvas_is_the_plain_forward(folder):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / folder)
    run = next(iter(read_runs(FIXTURES / folder).values()))
    canvas = run.output
    cache = KVCache.empty(model.cfg, batch=canvas.shape[0], n_pos=canvas.shape[1], like=model.W_E)
    with torch.no_grad():
        torch.testing.assert_close(model(canvas, kv_cache=cache), model(canvas), atol=1e-5, rtol=0)
        # the cache now holds the canvas; a window of it over the same tokens changes nothing
        torch.testing.assert_close(model(canvas[:, 6:14], kv_cache=cache, window_start=6), model(canvas)[:, 6:14],
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        model(canvas[:, 6:], kv_cache=cache, window_start=8)
    with pytest.raises(ValueError, match="attention_mask covers the whole canvas"):  # a window's mask is ambiguous
        model(canvas[:, 6:14], torch.ones_like(canvas[:, 6:14]), kv_cache=cache, window_start=6)
    with torch.no_grad():  # the canvas's own all-ones mask changes nothing
        torch.testing.assert_close(model(canvas[:, 6:14], torch.ones_like(canvas), kv_cache=cache, window_start=6),
                                   model(canvas)[:, 6:14], atol=1e-5, rtol=0)
