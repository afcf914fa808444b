"""Issue 10 item 6 (model side): out-of-vocabulary ids, empty inputs and inputs longer than the
model's context fail before the run with a sentence naming what was wrong."""

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def llada():
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")  # vocab 320, n_ctx 64


@pytest.fixture(scope="module")
def shipped():
    return HookedDiffusionTransformer.from_pretrained("tiny-refusal")  # has a tokenizer


def test_token_id_outside_the_vocabulary_is_named(llada):
    with pytest.raises(ValueError, match=r"Token id 500 \(row 1, position 2\) is outside the vocabulary: this model embeds ids 0\.\.319"):
        llada(torch.tensor([[1, 2, 3], [4, 5, 500]]))
    with pytest.raises(ValueError, match=r"Token id -1 \(row 0, position 0\)"):
        llada(torch.tensor([-1, 2, 3]))
    with pytest.raises(ValueError, match="Token id 320 "):  # the first id past the embedding
        llada.run_with_cache(torch.tensor([[319, 320]]))
    assert llada(torch.tensor([[0, 319]])).shape == (1, 2, 320)


def test_empty_inputs_fail_with_a_sentence(shipped):
    with pytest.raises(ValueError, match="empty list of prompts"):
        shipped.to_tokens([])
    with pytest.raises(ValueError, match="empty list of prompts"):
        shipped([])
    with pytest.raises(ValueError, match="empty list of prompts"):
        shipped.generate([], steps=4, gen_length=4, block_length=4, progress=False)
    with pytest.raises(ValueError, match=r"no tokens \(shape \(1, 0\)\)"):
        shipped(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"no tokens \(shape \(0, 5\)\)"):
        shipped(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no token ids"):
        shipped(torch.tensor([]))


def test_input_longer_than_the_context_fails_before_the_run(llada):
    seen = []
    with pytest.raises(ValueError, match=r"65 positions but this model's context is cfg\.n_ctx=64"):
        llada.run_with_hooks(torch.zeros(1, 65, dtype=torch.long), fwd_hooks=[("hook_embed", lambda x, hook: seen.append(1))])
    assert seen == []
    with pytest.raises(ValueError, match="n_ctx"):  # prompt 60 + response 8 > 64
        llada.generate(torch.zeros(1, 60, dtype=torch.long), steps=2, gen_length=8, block_length=8, progress=False)
    assert llada(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 320)


def test_no_context_check_when_the_checkpoint_states_none():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    model.cfg.n_ctx = None
    assert model(torch.zeros(1, 65, dtype=torch.long)).shape == (1, 65, 320)
