"""Per-layer attention kinds (bidirectional, causal, block-causal, sliding window) and padded
windowed forwards: the masks against hand-written ones, and a windowed forward over a cache filled
from the same canvas reproducing the full forward, logits and every hook point, on both the SDPA
and the explicit (hook_pattern) path."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_lens.core.components import attention, attention_masks_for, layer_kind_mask
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.core.kv_cache import KVCache
from diffusion_lens.core.model import HookedDiffusionCore

N_LAYERS = 4
WINDOW = (5, 9)  # canvas columns [5, 9) of 12


def tiny_config(**overrides) -> DiffusionConfig:
    fields = dict(d_model=32, n_layers=N_LAYERS, n_heads=4, n_key_value_heads=2, d_mlp=48, d_vocab=40)
    return DiffusionConfig(**{**fields, **overrides})


def by_rows(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[char == "1" for char in row] for row in rows])


def test_kind_masks_match_hand_written_ones_on_six_columns():
    cfg = tiny_config(layer_attention=("causal", "block_causal", "sliding_causal", "sliding"),
                      attention_block_size=2, sliding_window=2)
    expected = {
        "causal": ["100000", "110000", "111000", "111100", "111110", "111111"],
        "block_causal": ["110000", "110000", "111100", "111100", "111111", "111111"],
        "sliding_causal": ["100000", "110000", "011000", "001100", "000110", "000011"],  # 2 columns, itself included
        "sliding": ["111000", "111100", "111110", "011111", "001111", "000111"],  # |a - q| <= 2
    }
    for kind, rows in expected.items():
        assert torch.equal(layer_kind_mask(cfg, kind, range(6), 6, "cpu"), by_rows(rows)), kind
        # a window's rows are the canvas's rows at its absolute columns
        assert torch.equal(layer_kind_mask(cfg, kind, range(2, 5), 6, "cpu"), by_rows(rows[2:5])), kind
    assert layer_kind_mask(cfg, "bidirectional", range(6), 6, "cpu") is None


def test_kinds_combine_with_padding_and_are_built_once_per_kind():
    cfg = tiny_config(layer_attention=("causal", "bidirectional", "causal", "bidirectional"),
                      attention_mask_mode="query_key_padding")
    padding = torch.tensor([[0, 1, 1, 1]])
    masks = attention_masks_for(cfg, padding, range(1, 3), 4, torch.device("cpu"))
    assert masks[0] is masks[2] and masks[1] is masks[3]
    assert torch.equal(masks[0][0, 0], by_rows(["0100", "0110"]))  # causal AND key 0 padded
    assert torch.equal(masks[1].expand(1, 1, 2, 4)[0, 0], by_rows(["0111", "0111"]))


def test_bidirectional_layers_build_no_mask(monkeypatch):
    everywhere = tiny_config(layer_attention=("bidirectional",) * N_LAYERS)
    assert attention_masks_for(everywhere, None, range(3, 6), 8, torch.device("cpu")) == [None] * N_LAYERS
    assert attention_masks_for(everywhere, torch.ones(1, 8, dtype=torch.long), range(8), 8, torch.device("cpu")) == [None] * N_LAYERS

    def refuse(*args, **kwargs):
        raise AssertionError("a bidirectional model built a layer mask")

    monkeypatch.setattr(attention, "layer_kind_mask", refuse)
    model = HookedDiffusionCore(tiny_config()).eval()
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        model(tokens)
        model(tokens[:, 5:9], kv_cache=KVCache.empty(model.cfg, 2, 12, model.W_E), window_start=5)


LAYOUTS = {
    "causal": dict(layer_attention=("causal",) * N_LAYERS),
    "block_causal": dict(layer_attention=("block_causal",) * N_LAYERS, attention_block_size=3),
    "sliding_causal": dict(layer_attention=("sliding_causal",) * N_LAYERS, sliding_window=3),
    "sliding": dict(layer_attention=("sliding",) * N_LAYERS, sliding_window=2),
    "mixed": dict(layer_attention=("sliding_causal", "block_causal", "bidirectional", "causal"),
                  attention_block_size=4, sliding_window=3),
    "bidirectional": {},
}
PADDING = {
    "unpadded": dict(),
    "key_padding": dict(attention_mask_mode="key_padding"),
    "query_key_padding": dict(attention_mask_mode="query_key_padding", position_ids_mode="renumber_padded"),
    "causal_when_padded": dict(attention_mask_mode="causal_when_padded"),
}


def windowed_against_full(model: HookedDiffusionCore, tokens, mask):
    """(full forward's logits and activations, a window's) with the cache filled by the full forward."""
    start, stop = WINDOW
    cache = KVCache.empty(model.cfg, tokens.shape[0], tokens.shape[1], model.W_E)
    with torch.no_grad():
        full_logits, full = model.run_with_cache(tokens, mask, kv_cache=cache)
        full = {name: act.clone() for name, act in full.items()}
        window_logits, window = model.run_with_cache(tokens[:, start:stop], mask, kv_cache=cache, window_start=start)
        sdpa_full = model(tokens, mask)
        sdpa_window = model(tokens[:, start:stop], mask, kv_cache=cache, window_start=start)
    return full_logits, full, window_logits, dict(window.items()), sdpa_full, sdpa_window


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_window_reproduces_the_full_forward_at_its_columns(layout, padding):
    torch.manual_seed(0)
    model = HookedDiffusionCore(tiny_config(**LAYOUTS[layout], **PADDING[padding])).eval()
    tokens = torch.randint(0, 40, (3, 12))
    mask = None
    if padding != "unpadded":  # left padding, as the samplers batch prompts
        mask = torch.ones_like(tokens)
        mask[0, :6] = 0
        mask[2, :2] = 0
    start, stop = WINDOW
    full_logits, full, window_logits, window, sdpa_full, sdpa_window = windowed_against_full(model, tokens, mask)

    torch.testing.assert_close(full_logits, sdpa_full, atol=1e-5, rtol=0)  # explicit path == SDPA
    torch.testing.assert_close(window_logits, sdpa_window, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa_window, sdpa_full[:, start:stop], atol=1e-5, rtol=0)
    assert set(window) == set(full)
    for name, act in window.items():
        query_axis = 2 if name.endswith(("hook_attn_scores", "hook_pattern")) else 1
        torch.testing.assert_close(act, full[name].narrow(query_axis, start, stop - start), atol=1e-5, rtol=0,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_layouts_change_the_output():
    torch.manual_seed(0)
    plain = HookedDiffusionCore(tiny_config()).eval()
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        reference = plain(tokens)
        for layout, fields in LAYOUTS.items():
            if layout == "bidirectional":
                continue
            shaped = HookedDiffusionCore(tiny_config(**fields)).eval()
            shaped.load_state_dict(plain.state_dict())
            assert not torch.allclose(shaped(tokens), reference, atol=1e-3), layout


def test_canvas_wide_position_ids_are_sliced_to_the_window():
    torch.manual_seed(0)
    model = HookedDiffusionCore(tiny_config(**LAYOUTS["mixed"])).eval()
    tokens = torch.randint(0, 40, (2, 12))
    positions = torch.arange(12).repeat(2, 1) + torch.tensor([[0], [7]])
    cache = KVCache.empty(model.cfg, 2, 12, model.W_E)
    with torch.no_grad():
        full = model(tokens, position_ids=positions, kv_cache=cache)
        torch.testing.assert_close(full, model(tokens, position_ids=positions), atol=1e-5, rtol=0)
        window = model(tokens[:, 5:9], position_ids=positions, kv_cache=cache, window_start=5)
        torch.testing.assert_close(window, full[:, 5:9], atol=1e-5, rtol=0)
        assert not torch.allclose(model(tokens[:, 5:9], kv_cache=cache, window_start=5), window, atol=1e-4)


def test_a_windowed_forward_takes_only_canvas_wide_masks_and_positions():
    model = HookedDiffusionCore(tiny_config()).eval()
    tokens = torch.randint(0, 40, (2, 12))
    cache = KVCache.empty(model.cfg, 2, 12, model.W_E)
    window_mask = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask covers the whole canvas, shape \[batch n_pos\] = \[2, 12\]"):
        model(tokens[:, 5:9], window_mask, kv_cache=cache, window_start=5)
    with pytest.raises(ValueError, match=r"position_ids covers the whole canvas.*shape \[2, 4\]"):
        model(tokens[:, 5:9], position_ids=torch.arange(5, 9).repeat(2, 1), kv_cache=cache, window_start=5)


@pytest.mark.parametrize("fields, message", [
    (dict(layer_attention=("causal", "full", "causal", "causal")), r"kinds \['full'\] are not among"),
    (dict(layer_attention=("causal",) * 3), "layer_attention has 3 entries for n_layers=4"),
    (dict(layer_attention="causal"), r"must name one kind per layer, e.g. \('causal',\) \* n_layers"),
    (dict(layer_attention=("block_causal",) * 4), "attention_block_size must be a positive number"),
    (dict(layer_attention=("block_causal",) * 4, attention_block_size=0), "attention_block_size must be a positive"),
    (dict(layer_attention=("sliding_causal",) * 4), "sliding_window must be a positive number"),
    (dict(sliding_window=8), r"sliding_window=8 is set but no layer_attention entry is one of \['sliding', 'sliding_causal', 'window_sliding_prefix'\]"),
    (dict(layer_attention=("causal",) * 4, attention_block_size=2), "attention_block_size=2 is set but no layer_attention"),
])
def test_config_rejects_a_bad_attention_layout(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_the_layout_round_trips_through_json():
    cfg = tiny_config(**LAYOUTS["mixed"])
    again = DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.layer_attention == cfg.layer_attention and isinstance(again.layer_attention, tuple)
    assert (again.attention_block_size, again.sliding_window) == (4, 3)


def test_block_offsets_anchor_each_rows_blocks():
    """`block_offsets` count each row's blocks from its own column (a left-padded row's first real token):
    row 1, offset 1, is cut as row 0 shifted one column; the mask goes per row, ANDed with the padding."""
    cfg = tiny_config()
    offsets = torch.tensor([0, 1])
    mask = layer_kind_mask(cfg, "block_causal", range(1, 5), 5, "cpu", 2, offsets)
    assert mask[0].equal(by_rows(["11000", "11110", "11110", "11111"]))
    assert mask[1].equal(by_rows(["11100", "11100", "11111", "11111"]))
    assert layer_kind_mask(cfg, "block_causal", range(5), 5, "cpu", 2, torch.tensor([0])).equal(
        layer_kind_mask(cfg, "block_causal", range(5), 5, "cpu", 2)[None])
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    masks = attention_masks_for(cfg, padding, range(5), 5, "cpu", block_size=2, block_offsets=offsets)
    assert masks[0].shape == (2, 1, 5, 5) and not masks[0][1, 0, :, 0].any()
    # the pad (column 0, block -1) attends to nothing (SDPA outputs zero there); real columns see blocks 1-2, 3-4
    assert masks[0][1, 0, :, 1:].equal(by_rows(["0000", "1100", "1100", "1111", "1111"]))
    with pytest.raises(ValueError, match="pass attention_block_size= too"):
        attention_masks_for(cfg, padding, range(5), 5, "cpu", block_offsets=offsets)


def test_block_offsets_make_a_padded_row_equal_its_unpadded_forward():
    """Through the model: a row left-padded by 1 (not a whole block) with its blocks anchored at its first
    token gives the logits of the unpadded row (positions differ by the pad, RoPE is relative: float noise)."""
    torch.manual_seed(0)
    model = HookedDiffusionCore(tiny_config()).eval()
    ids = torch.randint(0, 40, (1, 7))
    alone = model(ids, attention_block_size=3)
    padded = torch.cat([ids.new_zeros(1, 1), ids], 1)
    mask = torch.tensor([[0] + [1] * 7])
    anchored = model(padded, mask, attention_block_size=3, attention_block_offsets=torch.tensor([1]))
    torch.testing.assert_close(anchored[:, 1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(padded, mask, attention_block_size=3)[:, 1:], alone, atol=1e-3)
