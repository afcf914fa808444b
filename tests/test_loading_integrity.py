"""Issue 10 items 1 and 6 (config side): checkpoint files, config.json fields and `dtype` strings
are checked at load time, and every failure names the file, tensor or key that is wrong."""

import json
import shutil

import pytest

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.adapters import detect_adapter
from tests.conftest import FIXTURES

N_CTX = {  # fixture -> its config.json context length (max_sequence_length / max_position_embeddings)
    "llada-tiny-mha": 64, "mmada-tiny": 64, "llada-moe-tiny": 64, "dream-tiny": 512,
}


@pytest.mark.parametrize("fixture, n_ctx", N_CTX.items())
def test_n_ctx_comes_from_the_checkpoint_and_is_written_back(fixture, n_ctx):
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    adapter = detect_adapter(config)
    cfg = adapter.to_config(config)
    assert cfg.n_ctx == n_ctx
    cfg.n_ctx = 2 * n_ctx
    assert adapter.to_config(adapter.to_checkpoint_config(cfg)).n_ctx == 2 * n_ctx


def test_embedded_model_n_ctx():
    assert HookedDiffusionTransformer.from_pretrained("tiny-refusal").cfg.n_ctx == 1024
