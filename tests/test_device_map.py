"""Issue 18 item 1: `from_pretrained(device_map=, max_memory=, offload_folder=)` through accelerate.

This machine has no GPU, so the maps place modules on "cpu" and "disk" (accelerate's disk offload: weights
in offload_folder, loaded per forward by an AlignDevicesHook) and every output is compared with a plain
load. Multi-GPU placement is checked on the meta model (accelerate sizes blocks against a max_memory
that names GPUs 0 and 1); the forward across two real GPUs (activations moved between devices by the
hooks) is not run here.
"""

import weakref

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens import hooks as H
from diffusion_lens.checkpoints import loading
from diffusion_lens.steering import ablate, orthogonalize_weights
from tests.conftest import FIXTURES
from tests.test_steering_core import one_thread  # noqa: F401  (autouse fixture)

NAME = "llada-tiny-mha"  # 3 blocks, untied head
RUN = dict(steps=8, gen_length=16, block_length=8, chat=False, progress=False)


def mixed_map(model_or_layers, *, tail="disk"):
    """embed on cpu, odd blocks on disk, even blocks on cpu, ln_final on `tail`, unembed on cpu."""
    n = model_or_layers if isinstance(model_or_layers, int) else model_or_layers.cfg.n_layers
    return {"embed": "cpu", **{f"blocks.{i}": "disk" if i % 2 else "cpu" for i in range(n)},
            "ln_final": tail, "unembed": "cpu"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    plain = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME)
    folder = tmp_path_factory.mktemp("offload") / "weights"
    placed = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME, device_map=mixed_map(plain.cfg.n_layers),
                                                        offload_folder=folder)
    return plain, placed, folder


def prompt():
    return torch.tensor([[300, 118, 262, 143, 229, 235]])


def canvas():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randint(0, 300, (2, 6), generator=g), torch.full((2, 8), 310)], dim=1)


def test_cpu_and_disk_placement_gives_the_plain_load_s_outputs(pair):
    plain, placed, folder = pair
    assert placed.hf_device_map == mixed_map(plain.cfg.n_layers)
    assert (folder / "index.json").is_file() and (folder / "blocks.1.attn.q_proj.weight.dat").is_file()
    assert placed.blocks[1].attn.q_proj.weight.device.type == "meta"  # offloaded: loaded per forward
    assert placed.blocks[0].attn.q_proj.weight.device.type == "cpu" and placed.cfg.device == "cpu"
    tokens = canvas()
    assert torch.equal(placed(tokens), plain(tokens))
    _, expected = plain.run_with_cache(tokens)
    _, got = placed.run_with_cache(tokens)
    assert sorted(got.keys()) == sorted(expected.keys())
    for name in expected.keys():
        assert torch.equal(got[name], expected[name]), name
    for kv_cache in (None, "dual"):
        run = dict(RUN, kv_cache=kv_cache)
        assert torch.equal(placed.generate(prompt(), seed=0, **run).sequences,
                           plain.generate(prompt(), seed=0, **run).sequences), kv_cache
    assert placed.blocks[1].attn.q_proj.weight.device.type == "meta"  # put back after each forward


def test_step_hooks_see_state_and_steering_hooks_act_on_offloaded_blocks(pair):
    plain, placed, _ = pair
    name = "blocks.1.hook_resid_post"  # an offloaded block's activation
    seen = {}

    def record(model):
        def hook(act, hook):
            seen.setdefault(id(model), []).append((hook.state.step, act.device.type, act.clone()))
        return hook

    outs = [m.generate(prompt(), seed=0, hooks=[H.at(name, record(m), steps={2, 5})], **RUN).sequences
            for m in (plain, placed)]
    assert torch.equal(outs[0], outs[1])
    a, b = seen[id(plain)], seen[id(placed)]
    assert [s for s, _, _ in b] == [2, 5] and all(device == "cpu" for _, device, _ in b)
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))
    direction = torch.randn(plain.cfg.d_model, generator=torch.Generator().manual_seed(1))
    tokens = canvas()
    steered = placed.run_with_hooks(tokens, fwd_hooks=ablate(placed, direction))
    assert torch.equal(steered, plain.run_with_hooks(tokens, fwd_hooks=ablate(plain, direction)))
    assert not torch.equal(steered, plain(tokens))
    run = dict(RUN, kv_cache="dual")
    assert torch.equal(placed.generate(prompt(), seed=0, hooks=ablate(placed, direction), **run).sequences,
                       plain.generate(prompt(), seed=0, hooks=ablate(plain, direction), **run).sequences)


def test_weight_edits_work_on_placed_blocks_and_refuse_offloaded_ones(tmp_path):
    plain = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME)
    on_cpu = {"": "cpu"}
    placed = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME, device_map=on_cpu)
    direction = torch.randn(plain.cfg.d_model, generator=torch.Generator().manual_seed(2))
    assert orthogonalize_weights(placed, direction) == orthogonalize_weights(plain, direction)
    assert torch.equal(placed(canvas()), plain(canvas()))
    offloaded = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME, device_map=mixed_map(plain),
                                                           offload_folder=tmp_path / "w")
    before = offloaded(canvas())
    with pytest.raises(ValueError, match="Cannot fold into blocks.1.attn.o_proj: device_map offloads its weights"):
        orthogonalize_weights(offloaded, direction, layers=[1], embedding=False)
    assert torch.equal(offloaded(canvas()), before)
    with pytest.raises(ValueError, match=r"weights \(blocks.1.ln1.weight, .*\) are offloaded by device_map"):
        offloaded.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_auto_spills_what_does_not_fit_max_memory_to_disk(tmp_path):
    plain = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME)
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME, device_map="auto",
                                                       max_memory={"cpu": total // 2}, offload_folder=tmp_path / "w")
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, model.hf_device_map
    on_cpu = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    assert 0 < on_cpu <= total // 2
    assert torch.equal(model(canvas()), plain(canvas()))


def test_auto_places_whole_blocks_over_two_gpus_on_the_meta_model():
    """What "auto" / "balanced" give for two GPUs (no GPU needed: accelerate sizes the meta model)."""
    meta = meta_model()
    total = sum(p.numel() * p.element_size() for p in meta.parameters())
    placement = loading.resolve_device_map(meta, "auto", max_memory={0: total, 1: total, "cpu": total})
    assert placement["embed"] == 0 and placement["unembed"] == 1
    assert {placement[f"blocks.{i}"] for i in range(meta.cfg.n_layers)} == {0, 1}  # split between blocks
    assert not any(name.count(".") > 1 for name in placement)  # never inside a block
    assert loading.resolve_device_map(meta, "sequential", max_memory={0: total, 1: total}) == {"": 0}
    tied = meta_model("diffusion-gemma-tiny-dense")  # accelerate alone fails on "embed" / "unembed" ties
    total = sum(p.numel() * p.element_size() for p in tied.parameters())
    placement = loading.resolve_device_map(tied, "auto", max_memory={0: total, 1: total, "cpu": total})
    assert placement["embed"] == placement["unembed"] == 0 and placement["blocks.2"] == 1, placement
    assert tied.unembed.weight is tied.embed.weight


def test_a_kv_cache_on_another_device_than_its_block_is_refused(pair):
    _, placed, _ = pair
    guards = [hook for block in placed.blocks for hook in block._forward_pre_hooks.values()
              if isinstance(hook, loading._KVCacheOnDevice)]
    assert [(g.layer, g.device) for g in guards] == [(i, torch.device("cpu")) for i in range(placed.cfg.n_layers)]
    elsewhere = (torch.zeros(1, device="meta"), torch.zeros(1, device="meta"))
    with pytest.raises(RuntimeError, match="blocks.1 runs on cpu but its KV cache layer is on meta"):
        guards[1](placed.blocks[1], (None, None, None, elsewhere, 0), {})
    assert guards[1](placed.blocks[1], (None, None, None, None, 0), {}) is None


def test_a_kv_cache_is_allocated_on_each_block_s_execution_device(pair, monkeypatch):
    """generate allocates layer l's keys and values where block l computes (accelerate's execution device),
    so on several GPUs each block writes its own cache in place; simulated here with a fake dispatch hook."""
    from diffusion_lens.core.kv_cache import KVCache

    plain, placed, _ = pair
    assert placed.block_devices() == plain.block_devices() == [torch.device("cpu")] * plain.cfg.n_layers
    monkeypatch.setattr(plain.blocks[1], "_hf_hook", type("Hook", (), {"execution_device": "meta"})(), raising=False)
    devices = plain.block_devices()
    assert devices == [torch.device("cpu"), torch.device("meta"), torch.device("cpu")]
    cache = KVCache.empty(plain.cfg, 2, 14, like=plain.W_E, devices=devices)
    assert [k.device.type for k in cache.keys] == [v.device.type for v in cache.values] == ["cpu", "meta", "cpu"]
    with pytest.raises(ValueError, match="devices has 2 entries; the model has 3 layers"):
        KVCache.empty(plain.cfg, 2, 14, like=plain.W_E, devices=devices[:2])


def meta_model(name=NAME):
    config_json = loading.read_config(FIXTURES / name)
    cfg = loading.detect_adapter(config_json).to_config(config_json)
    cfg.dtype = torch.float32
    return loading._meta_model(HookedDiffusionTransformer, cfg)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="cpu", device_map={"": "cpu"}), "pass one"),
    (dict(device_map={"": "cpu", "blocks.9": "cpu"}), r"1 modules this model does not have \(blocks.9\)"),
    (dict(device_map={"embed": "cpu", "blocks": "cpu"}), r"leaves 2 weights \(ln_final.weight, unembed.weight\) unplaced"),
    (dict(device_map={"": "cpu", "blocks.0": "cpu"}), "'blocks.0' inside ''"),
    (dict(device_map={**mixed_map(3), "blocks.0": "cpu", "blocks.0.attn": "disk"}), "'blocks.0.attn' inside 'blocks.0'"),
    (dict(device_map={"embed": "cpu", "blocks.0.attn": "cpu", "blocks.0.mlp": "cpu", "blocks.0.ln1": "cpu",
                      "blocks.0.ln2": "cpu", "blocks.1": "cpu", "blocks.2": "cpu", "ln_final": "cpu", "unembed": "cpu"}),
     "splits transformer blocks"),
    (dict(device_map={**mixed_map(3), "embed": "disk"}, offload_folder="unused"), "puts 'embed' on 'disk'"),
    (dict(device_map={**mixed_map(3), "embed": "cpu", "unembed": 0}), r"puts 'embed' on 'cpu'.*\(one of \['0'\]\)"),
    (dict(device_map=mixed_map(3)), r"on 'disk'; pass offload_folder="),
    (dict(device_map={"": "gpu7"}), "is not a device"),
    (dict(device_map="fastest"), "not a strategy"),
    (dict(device_map={"": "cpu"}, max_memory={"cpu": "1GiB"}), "already given"),
    (dict(max_memory={"cpu": "1GiB"}), "need device_map="),
])
def test_bad_maps_are_refused_before_any_weight_is_read(kwargs, message, monkeypatch):
    monkeypatch.setattr(loading, "iter_safetensors", lambda *a: pytest.fail("read weights"))
    with pytest.raises(ValueError, match=message):
        HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME, **kwargs)


def test_a_tied_head_stays_with_the_embedding_and_the_offload_folder_must_be_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "iter_safetensors", lambda *a: pytest.fail("read weights"))
    meta = meta_model("diffusion-gemma-tiny-dense")
    tied = {name: "cpu" for name, _ in meta.named_children() if name != "unembed"} | {"unembed": "disk"}
    with pytest.raises(ValueError, match="ties its LM head.*place 'unembed' on the embedding's device 'cpu', not 'disk'"):
        HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny-dense", device_map=tied,
                                                   offload_folder=tmp_path / "w")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.dat").write_bytes(b"x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME, device_map=mixed_map(3), offload_folder=tmp_path / "full")


def test_diffusion_gemma_with_passes_and_a_tied_head_runs_placed(tmp_path):
    """Two passes, self-conditioning that reads the embedding at the top level, a tied head, a KV cache."""
    name = "diffusion-gemma-tiny-dense"
    plain = HookedDiffusionTransformer.from_pretrained(FIXTURES / name)
    children = [child for child, _ in plain.named_children() if sum(1 for _ in _.parameters()) or child == "blocks"]
    device_map = {child: "cpu" for child in children if child != "blocks"}
    device_map |= {f"blocks.{i}": "disk" if i % 2 else "cpu" for i in range(plain.cfg.n_layers)}
    placed = HookedDiffusionTransformer.from_pretrained(FIXTURES / name, device_map=device_map,
                                                        offload_folder=tmp_path / "w")
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    auto = HookedDiffusionTransformer.from_pretrained(FIXTURES / name, device_map="auto", max_memory={"cpu": total // 2},
                                                      offload_folder=tmp_path / "auto")
    assert auto.hf_device_map["unembed"] == "cpu" and "disk" in auto.hf_device_map.values(), auto.hf_device_map
    tokens = torch.tensor([[2, 17, 33, 41, 5]])
    expected = plain.generate(tokens, seed=0, max_new_tokens=16, progress=False).sequences
    for model in (placed, auto):
        assert model.unembed.weight is model.embed.weight
        assert torch.equal(model.generate(tokens, seed=0, max_new_tokens=16, progress=False).sequences, expected)


def test_disk_offload_streams_each_tensor_out(tmp_path, monkeypatch):
    """While loading, the checkpoint tensors still alive stay at the cpu-placed weights plus one shard,
    far below the whole model: a disk-placed tensor is written to offload_folder and let go at once."""
    plain = HookedDiffusionTransformer.from_pretrained(FIXTURES / NAME)
    folder = plain.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    read, alive, peak = loading.iter_safetensors, [], [0]

    def counting(*args):
        for name, tensor in read(*args):
            alive.append(weakref.ref(tensor))
            peak[0] = max(peak[0], sum(t.nbytes for ref in alive if (t := ref()) is not None))
            yield name, tensor

    monkeypatch.setattr(loading, "iter_safetensors", counting)
    device_map = {"embed": "cpu", "blocks": "disk", "ln_final": "disk", "unembed": "disk"}
    model = HookedDiffusionTransformer.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "w")
    kept = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    assert kept == model.embed.weight.nbytes and len(alive) == len(plain.state_dict())
    assert peak[0] <= kept + max(path.stat().st_size for path in shards), (peak[0], kept, total)
    assert peak[0] < total / 2
    assert torch.equal(model(canvas()), plain(canvas()))


def test_an_abliteration_edit_of_offloaded_weights_is_refused_and_changes_nothing(pair):
    from diffusion_lens.steering import AblationKernel, AbliterationEdit

    _, placed, _ = pair
    edit = AbliterationEdit.from_directions(torch.randn(placed.cfg.n_layers, placed.cfg.d_model),
                                            {"attention": AblationKernel(1.0, 1.0, 1.0, 2.0)})
    before = {n: p.detach().clone() for n, p in placed.named_parameters() if p.device.type != "meta"}
    with pytest.raises(ValueError, match=r"Cannot fold into blocks\.1\..*device_map offloads its weights"):
        edit.apply(placed)
    assert all(torch.equal(p, before[n]) for n, p in placed.named_parameters() if n in before)
