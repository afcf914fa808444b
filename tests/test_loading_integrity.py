"""Issue 10 items 1 and 6 (config side): checkpoint files, config.json fields and `dtype` strings
are checked at load time, and every failure names the file, tensor or key that is wrong."""

import json
import shutil
import warnings

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.checkpoints.adapters import detect_adapter
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


# ---------------------------------------------------------------- safetensors files
def copy_fixture(tmp_path, name="llada-tiny-mha"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target, ignore=shutil.ignore_patterns("golden*"))
    return target


def header_of(path):
    """The JSON header of a safetensors file, read by hand (the test must not trust the code under test)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


def write_raw(path, header, data):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def test_truncated_shard_names_the_file_and_the_cut_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    shard = folder / "model.safetensors"
    _, header = header_of(shard)
    header.pop("__metadata__", None)
    last = max(header, key=lambda name: header[name]["data_offsets"][1])
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard}.*tensor '{last}' ends at data byte .*truncated"):
        HookedDiffusionTransformer.from_pretrained(folder)


@pytest.mark.parametrize("content, reason", [
    (b"", "it is empty"),
    (b"\x01\x02\x03", "fewer than the 8-byte header length"),
    (bytes(range(256)) * 4, "announce a .*-byte header"),        # random bytes: a huge length field
    (b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"", "announce a 64-byte header"),  # header cut short
    (b"\x08\x00\x00\x00\x00\x00\x00\x00not json", "header is not JSON"),
])
def test_corrupt_files_fail_with_the_file_name(tmp_path, content, reason):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=f"model.safetensors is not a complete safetensors file: .*{reason}") as error:
        HookedDiffusionTransformer.from_pretrained(folder)
    assert type(error.value) is ValueError  # not struct.error / OverflowError / json.JSONDecodeError


@pytest.mark.parametrize("entries, data, reason", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4,
     r"tensor 'a' is F32 \[2\] \(8 bytes\) but its data_offsets span 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     b"\0" * 12, r"tensor 'b' \(bytes 4..12\) overlaps tensor 'a' \(bytes 0..8\)"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "data bytes 0..4, before tensor 'a', belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "its last 4 data bytes belong to no tensor"),
    ({"a": {"dtype": "F4", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 'a' has dtype 'F4', not one of"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, r"tensor 'a' has shape \[-1\]"),
])
def test_header_must_describe_the_data_exactly(tmp_path, entries, data, reason):
    from diffusion_lens.checkpoints.loading import read_safetensors_header

    path = tmp_path / "x.safetensors"
    write_raw(path, entries, data)
    with pytest.raises(ValueError, match=f"{path} is not a complete safetensors file: {reason}"):
        read_safetensors_header(path)


def test_a_short_read_names_the_tensor(tmp_path):
    """The header was checked, then the file shrank before the tensors were read."""
    from diffusion_lens.checkpoints.loading import iter_safetensors, read_safetensors_header

    shard = copy_fixture(tmp_path) / "model.safetensors"
    header = read_safetensors_header(shard)
    shard.write_bytes(shard.read_bytes()[:header.data_start + header.entries[0].end + 3])
    with pytest.raises(ValueError, match=rf"reading tensor '{header.entries[1].name}' returned 3 of its \d+ bytes"):
        list(iter_safetensors(shard, header))


def test_index_pointing_a_tensor_at_the_wrong_shard_is_named(tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=60_000)
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in sorted(index["weight_map"].items()) if v == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"points 1 tensors at shards that do not hold them, e.g. '{name}' at {shards[1]} "
                                         rf"\(it is in {shards[0]}\)"):
        HookedDiffusionTransformer.from_pretrained(tmp_path / "sharded")


def test_key_mismatch_error_stays_short(tmp_path):
    """Weights under another family's names: counts and the first few names, not every key."""
    from safetensors.torch import load_file, save_file

    folder = copy_fixture(tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({"renamed." + k: v for k, v in weights.items()}, folder / "model.safetensors")
    with pytest.raises(ValueError) as error:
        HookedDiffusionTransformer.from_pretrained(folder)
    message = str(error.value)
    n = len(weights)
    assert f"{n} missing keys (" in message and f"{n} unexpected keys (renamed." in message
    assert f"... {n - 5} more" in message and len(message) < 1500, message


# ---------------------------------------------------------------- dtype
@pytest.mark.parametrize("name", ["bfloat16", "bf16", "torch.bfloat16"])
def test_dtype_accepts_a_string(name):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha", dtype=name)
    assert model.cfg.dtype == torch.bfloat16 and model.W_E.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat", "int8", torch.int8])
def test_unknown_dtype_lists_the_valid_ones(dtype):
    with pytest.raises(ValueError, match=r"is not a floating dtype.*'bfloat16'.*'float16'.*'float32'"):
        HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha", dtype=dtype)


# ---------------------------------------------------------------- config.json
def with_config(tmp_path, fixture, **changes):
    folder = copy_fixture(tmp_path, fixture)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is DROP]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


DROP = object()


@pytest.mark.parametrize("fixture, key", [
    ("llada-tiny-mha", "d_model"), ("llada-tiny-mha", "n_layers"), ("llada-tiny-mha", "mask_token_id"),
    ("mmada-tiny", "n_heads"), ("dream-tiny", "hidden_size"), ("dream-tiny", "num_attention_heads"),
    ("llada-moe-tiny", "num_hidden_layers"), ("llada-moe-tiny", "rope_theta"),
])
def test_missing_required_config_key_is_named(tmp_path, fixture, key):
    folder = with_config(tmp_path, fixture, **{key: DROP})
    with pytest.raises(ValueError, match=rf"config.json: \w+ config.json lacks required keys \['{key}'\]"):
        HookedDiffusionTransformer.from_pretrained(folder)


@pytest.mark.parametrize("fixture, changes, message", [
    ("llada-tiny-mha", {"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_scaling="),
    ("llada-tiny-mha", {"multi_query_attention": True}, "multi_query_attention=True"),
    ("dream-tiny", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling="),
    ("dream-tiny", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("llada-moe-tiny", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling="),
])
def test_unimplemented_math_keys_fail(tmp_path, fixture, changes, message):
    folder = with_config(tmp_path, fixture, **changes)
    with pytest.raises(ValueError, match=f"{message}.*which diffusion_lens does not implement"):
        HookedDiffusionTransformer.from_pretrained(folder)


def test_multi_query_attention_without_n_kv_heads_means_one_kv_head():
    config = json.loads((FIXTURES / "llada-tiny-mha" / "config.json").read_text())
    cfg = detect_adapter(config).to_config({**config, "multi_query_attention": True, "n_kv_heads": None})
    assert cfg.n_key_value_heads == 1


@pytest.mark.parametrize("fixture, changes", [
    ("llada-tiny-mha", {"flash_attention": True, "attention_dropout": 0.1}),
    ("llada-moe-tiny", {"norm_topk_prob": True, "routed_scaling_factor": 2.5}),
    ("dream-tiny", {"use_mrope": True}),
])
def test_inert_keys_are_listed_in_one_warning(tmp_path, fixture, changes):
    folder = with_config(tmp_path, fixture, **changes)
    with pytest.warns(UserWarning) as record:
        HookedDiffusionTransformer.from_pretrained(folder)
    listed = [w for w in record if "ignores these keys" in str(w.message)]
    assert len(listed) == 1 and all(key in str(listed[0].message) for key in changes)


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file()))
def test_every_fixture_config_loads_without_a_warning(fixture):
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detect_adapter(config).to_config(config)


def test_sharded_bf16_diffusion_gemma_keeps_the_tie_and_the_carried_tensors(tmp_path):
    """Issue 13 item 6: the path bench/load_memory.py measures (shards, bf16, a tied LM head, a
    carried vision tower). The LM head stays the embedding's storage after the cast, the vision
    tower comes back as stored, and transformers' own class loads the written shards with no key
    missing, unexpected or mismatched, holding our weights."""
    from transformers import DiffusionGemmaForBlockDiffusion  # the live reference (heavy import)

    source = HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny", dtype="bfloat16")
    folder = source.save_pretrained(tmp_path / "sharded", max_shard_bytes=60_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2 and (folder / "model.safetensors.index.json").is_file()
    model = HookedDiffusionTransformer.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.unembed.weight.data_ptr() == model.embed.weight.data_ptr()
    assert set(model.carried_tensors) == set(source.carried_tensors) and len(model.carried_tensors) >= 18
    for key, tensor in source.carried_tensors.items():
        assert model.carried_tensors[key].dtype == tensor.dtype == torch.float32, key  # as stored, not cast
        assert torch.equal(model.carried_tensors[key], tensor), key
    reference, info = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reference.lm_head.weight.data_ptr() == reference.model.decoder.embed_tokens.weight.data_ptr()
    assert torch.equal(reference.model.decoder.embed_tokens.weight.to(torch.bfloat16), model.embed.weight)
    assert torch.equal(reference.model.decoder.layers[0].experts.gate_up_proj.to(torch.bfloat16),
                       model.blocks[0].mlp.experts.gate_up_proj)
