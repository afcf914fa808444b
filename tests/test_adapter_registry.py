"""Issue 4: adapter auto-detection from every fixture's config.json, and a third-party adapter
defined in this file that registers and loads a checkpoint without touching `diffusion_lens/`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.checkpoints import adapters as adapter_registry
from diffusion_lens.checkpoints.adapters import KeyRule, ModelAdapter, detect_adapter, register_adapter, registered_adapters
from tests.conftest import FIXTURES

EXPECTED = {
    "llada-tiny-mha": "llada",
    "llada-tiny-gqa": "llada",
    "mmada-tiny": "mmada",
    "llada-moe-tiny": "llada_moe",
    "llada-moe-tiny-variant": "llada_moe",
    "dream-tiny": "dream",
    "dream-tiny-b": "dream",
}


@pytest.mark.parametrize("fixture, adapter", EXPECTED.items())
def test_each_fixture_is_claimed_by_exactly_its_adapter(fixture, adapter):
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    claimed = [a.name for a in registered_adapters().values() if a.matches(config)]
    assert claimed == [adapter]
    assert detect_adapter(config).name == adapter


@pytest.mark.parametrize("fixture", ["mmada-tiny", "llada-moe-tiny", "dream-tiny"])
def test_from_pretrained_picks_the_adapter(fixture):
    assert HookedDiffusionTransformer.from_pretrained(FIXTURES / fixture).adapter.name == EXPECTED[fixture]


def test_llada_moe_is_recognised_by_num_experts_alone():
    """LLaDA-MoE says model_type "llada"; without `architectures` the MoE keys still decide."""
    config = json.loads((FIXTURES / "llada-moe-tiny" / "config.json").read_text())
    del config["architectures"]
    assert detect_adapter(config).name == "llada_moe"
    assert detect_adapter({**config, "model_type": "lladamoe"}).name == "llada_moe"
    dense = json.loads((FIXTURES / "llada-tiny-mha" / "config.json").read_text())
    assert not registered_adapters()["llada_moe"].matches(dense)


def test_unknown_config_error_lists_adapters():
    with pytest.raises(ValueError, match="No adapter recognises") as error:
        detect_adapter({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    for name in EXPECTED.values():
        assert name in str(error.value)


# ---------------------------------------------------------------- a third-party adapter, end to end
TOY_RULES = (
    KeyRule("tok_emb", "embed.weight"),
    KeyRule("layer{l}.norm_a", "blocks.{l}.ln1.weight"),
    KeyRule("layer{l}.wq", "blocks.{l}.attn.q_proj.weight"),
    KeyRule("layer{l}.wk", "blocks.{l}.attn.k_proj.weight"),
    KeyRule("layer{l}.wv", "blocks.{l}.attn.v_proj.weight"),
    KeyRule("layer{l}.wo", "blocks.{l}.attn.o_proj.weight"),
    KeyRule("layer{l}.norm_b", "blocks.{l}.ln2.weight"),
    KeyRule("layer{l}.w_gate", "blocks.{l}.mlp.gate_proj.weight"),
    KeyRule("layer{l}.w_up", "blocks.{l}.mlp.up_proj.weight"),
    KeyRule("layer{l}.w_down", "blocks.{l}.mlp.down_proj.weight"),
    KeyRule("final_norm", "ln_final.weight"),
    KeyRule("head", "unembed.weight"),
)
LLADA_TO_TOY = {
    "model.transformer.wte.weight": "tok_emb", "model.transformer.ln_f.weight": "final_norm",
    "model.transformer.ff_out.weight": "head",
    **{f"model.transformer.blocks.{{l}}.{a}.weight": f"layer{{l}}.{b}" for a, b in [
        ("attn_norm", "norm_a"), ("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("attn_out", "wo"),
        ("ff_norm", "norm_b"), ("ff_proj", "w_gate"), ("up_proj", "w_up"), ("ff_out", "w_down")]},
}


def write_toy_checkpoint(folder):
    """llada-tiny-mha's weights under renamed keys, with a config.json in a made-up format."""
    folder.mkdir()
    weights = load_file(FIXTURES / "llada-tiny-mha" / "model.safetensors")
    renamed = {}
    for key, tensor in weights.items():
        parts = key.split(".")
        if parts[2] == "blocks":
            layer = parts[3]
            template = ".".join(parts[:3] + ["{l}"] + parts[4:])
            renamed[LLADA_TO_TOY[template].format(l=layer)] = tensor
        else:
            renamed[LLADA_TO_TOY[key]] = tensor
    save_file(renamed, folder / "model.safetensors")
    src = json.loads((FIXTURES / "llada-tiny-mha" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        "model_type": "toy-diffusion", "width": src["d_model"], "depth": src["n_layers"], "heads": src["n_heads"],
        "ffn": src["mlp_hidden_size"], "vocab": src["vocab_size"], "theta": src["rope_theta"],
        "eps": src["rms_norm_eps"], "mask_id": src["mask_token_id"], "pad_id": src["pad_token_id"],
    }))


def test_a_toy_adapter_defined_outside_the_package_loads_and_saves(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_registry, "_REGISTRY", dict(adapter_registry._REGISTRY))

    @register_adapter
    class ToyAdapter(ModelAdapter):
        name = "toy"
        key_rules = TOY_RULES

        def matches(self, config):
            return config.get("model_type") == "toy-diffusion"

        def to_config(self, config):
            from diffusion_lens import DiffusionConfig

            return DiffusionConfig(
                d_model=config["width"], n_layers=config["depth"], n_heads=config["heads"], d_mlp=config["ffn"],
                d_vocab=config["vocab"], rope_theta=config["theta"], norm_eps=config["eps"],
                mask_token_id=config["mask_id"], pad_token_id=config["pad_id"], family="toy",
                extra={"checkpoint_config": config},
            )

        def to_checkpoint_config(self, cfg):
            return dict(cfg.extra["checkpoint_config"])

    folder = tmp_path / "toy"
    write_toy_checkpoint(folder)
    model = HookedDiffusionTransformer.from_pretrained(folder)
    assert model.adapter.name == "toy"
    reference = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    ids = load_file(FIXTURES / "llada-tiny-mha" / "golden_forward.safetensors")["input_ids"]
    assert torch.equal(model(ids), reference(ids))
    model.save_pretrained(tmp_path / "saved")
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(load_file(folder / "model.safetensors"))
    assert HookedDiffusionTransformer.from_pretrained(tmp_path / "saved").adapter.name == "toy"


def test_toy_checkpoint_without_its_adapter_is_refused_with_a_pointer(tmp_path):
    folder = tmp_path / "toy"
    write_toy_checkpoint(folder)
    with pytest.raises(ValueError, match="adding_a_model"):
        HookedDiffusionTransformer.from_pretrained(folder)


def test_forcing_the_wrong_adapter_names_the_keys(tmp_path):
    """A Qwen2-layout adapter forced onto an MoE checkpoint: the loader names what does not fit,
    first the config.json key Dream needs, then (with that key added) the weights."""
    with pytest.raises(ValueError, match=r"lacks required keys \['intermediate_size'\].*looks like a llada_moe checkpoint"):
        HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-moe-tiny", adapter="dream")
    folder = tmp_path / "moe"
    shutil.copytree(FIXTURES / "llada-moe-tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"missing keys .*model\.layers\.0\.mlp\.gate_proj\.weight.*unexpected keys .*experts"):
        HookedDiffusionTransformer.from_pretrained(folder, adapter="dream")
