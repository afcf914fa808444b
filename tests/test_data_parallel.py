"""Issue 18 item 2: the studies under `torch.distributed` give the numbers of one process.

This file run as a script is one worker: it loads the embedded tiny-refusal, runs every sharded
function on the same prompts (odd counts, so the ranks get different numbers of batches) and saves
what they return. The test starts one worker alone (no process group) and two as ranks of a gloo
group (`init_method=file://`), all at once with one torch thread each, then checks that both ranks
return the same results and that they equal the single process's:

* bit for bit: `select_direction` (given candidates), `sensitivity`, `patch_across_steps`,
  `generate_texts`, `evaluate` (its rows and the file rank 0 writes), and the search's trial
  parameters and refusal objective;
* float64 round-off: `mean_difference` (float64 sums added across ranks in another grouping) and
  so the search's KL objective, whose candidate directions come from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

OPTS = dict(gen_length=8, steps=8, block_length=8)
BATCH = 2


def run_all(out: Path) -> dict:
    """Every sharded function on tiny-refusal; the results as plain tensors / lists."""
    from diffusion_lens import HookedDiffusionTransformer
    from diffusion_lens.abliterate import SearchSpace, search
    from diffusion_lens.evals import SubstringJudge, evaluate, generate_texts
    from diffusion_lens.steering import mean_difference, patch_across_steps, select_direction, sensitivity
    from diffusion_lens.studies.abliteration import prompt_sets

    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    # five prompts per set, batches of two: the ranks run two and one batches (the last one a single prompt)
    sets = {name: prompts[:5] for name, prompts in prompt_sets("tiny-refusal", None, None, n_train=6, n_eval=6).items()}
    harmful, harmless = sets["harmful_train"], sets["harmless_train"]
    res: dict = {}

    dirs = mean_difference(model, harmful, harmless, positions="post_instruction", gen_length=8, batch_size=BATCH,
                           subspace=True, progress=False)
    pooled = mean_difference(model, harmful, harmless, positions="mean_prompt", gen_length=8, batch_size=BATCH,
                             progress=False)
    res["mean_difference"] = [dirs.mean_positive, dirs.mean_negative, dirs.second_moment_positive,
                              pooled.mean_positive, pooled.mean_negative]

    sel = select_direction(model, harmful, harmless, sets["harmful_eval"], sets["harmless_eval"],
                           candidates=dirs, gen_length=8, batch_size=BATCH, progress=False)
    res["select_direction"] = [sel.bypass, sel.induce, sel.kl, sel.kept, (sel.winner or {}).get("layer")]

    r = dirs.unit(1, "post_instruction[-1]").float()
    sens = sensitivity(model, r, sets["harmful_eval"], over=("layers", "steps"), window=4, batch_size=BATCH,
                       generate_kwargs=dict(OPTS, seed=0), progress=False)
    res["sensitivity"] = [sens.values, sens.baseline, sens.full]

    gen = torch.Generator().manual_seed(3)
    clean, corrupt = torch.randint(0, 200, (3, 6), generator=gen), torch.randint(0, 200, (3, 6), generator=gen)
    opts = dict(OPTS, temperature=0.7, seed=11)
    clean_out = model.generate(clean, progress=False, **opts)
    patched = patch_across_steps(model, clean, corrupt, names=["hook_embed", "blocks.1.hook_resid_pre"],
                                 steps=[range(8), [0], [6, 7]], positions=[None, "response"],
                                 metric=lambda o: (o.responses == clean_out.responses).double().mean(),
                                 generate_kwargs=opts, progress=False)
    res["patch_across_steps"] = [patched.effects, patched.clean, patched.corrupted]

    res["generate_texts"] = generate_texts(model, sets["harmful_eval"], batch_size=BATCH, seed=5,
                                           temperature=0.5, **OPTS)
    questions = sets["harmful_eval"] + sets["harmless_eval"][:2]  # 7 prompts
    run = evaluate(model, questions, judges=[SubstringJudge.jailbreakbench()], out=out / "run.jsonl",
                   batch_size=BATCH, generate_kwargs=OPTS, progress=False)
    res["evaluate"] = [run.rows, run.summary(), len(questions)]

    found = search(model, **sets, trials=2, seed=0, generate_kwargs=OPTS, batch_size=BATCH, progress=False,
                   space=SearchSpace(positions=("post_instruction", "mean_response")))
    res["search"] = [[(t.number, t.params, t.values, t.user_attrs) for t in found.trials()],
                     sorted(found.candidates.directions)]
    return res


def worker(out: str, rank: int, size: int) -> None:
    """One process; `size` 0: alone, without a process group."""
    torch.set_num_threads(1)
    folder = Path(out)
    if size:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=size)
    results = run_all(folder / ("group" if size else "alone"))
    from diffusion_lens.evals import generate_texts
    from diffusion_lens.prompts.distributed import my_batches, world

    results["world"] = [world(), my_batches(["b0", "b1", "b2"])]
    if size:  # sampling without seed= draws from the global RNG in batch order: refused under several ranks
        from diffusion_lens import HookedDiffusionTransformer

        try:
            generate_texts(HookedDiffusionTransformer.from_pretrained("tiny-refusal"), ["Hi", "Hello", "Hey"],
                           batch_size=BATCH, temperature=0.5, **OPTS)
        except ValueError as error:
            results["unseeded"] = str(error)
    torch.save(results, folder / f"{'group' if size else 'alone'}{rank}.pt")
    if size:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("data_parallel")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(folder), str(rank), str(size)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, size in ((0, 0), (0, 2), (1, 2))]
    outs = [p.communicate(timeout=300) for p in procs]
    failed = [f"worker {i} (exit {p.returncode}):\n{err[-3000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    load = lambda name: torch.load(folder / name, weights_only=False)  # noqa: E731
    return {"alone": load("alone0.pt"), "ranks": [load("group0.pt"), load("group1.pt")], "folder": folder}


def same(a, b) -> bool:
    """Bit for bit (tensors: equal values, dtype and shape; NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5)) and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", ["select_direction", "sensitivity", "patch_across_steps", "generate_texts",
                                  "evaluate"])
def test_bit_for_bit_on_two_ranks(results, name):
    rank0, rank1 = (r[name] for r in results["ranks"])
    assert same(rank0, rank1)
    assert same(rank0, results["alone"][name])


def test_each_rank_runs_its_own_batches(results):
    assert results["alone"]["world"] == [(0, 1), [(0, "b0"), (1, "b1"), (2, "b2")]]
    assert [r["world"] for r in results["ranks"]] == [[(0, 2), [(0, "b0"), (2, "b2")]], [(1, 2), [(1, "b1")]]]


def test_unseeded_sampling_is_refused_under_several_ranks(results):
    for r in results["ranks"]:
        assert "no seed= was given" in r.get("unseeded", "")


def test_mean_difference_to_float64_round_off(results):
    alone = results["alone"]["mean_difference"]
    rank0, rank1 = (r["mean_difference"] for r in results["ranks"])
    assert same(rank0, rank1)  # the ranks hold the same sums
    for a, b in zip(alone, rank0):
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_evaluate_file_is_what_one_process_writes(results):
    folder = results["folder"]
    assert (folder / "group" / "run.jsonl").read_bytes() == (folder / "alone" / "run.jsonl").read_bytes()
    rows, _, n = results["alone"]["evaluate"]
    assert [row["index"] for row in rows] == list(range(n)) and n % BATCH == 1  # a last batch of one


def test_search_trials_match_one_process(results):
    alone, rank0, rank1 = results["alone"]["search"], *(r["search"] for r in results["ranks"])
    assert same(rank0, rank1)
    assert alone[1] == rank0[1] and len(alone[0]) == len(rank0[0]) == 2
    for (n, params, values, attrs), (n2, params2, values2, attrs2) in zip(alone[0], rank0[0]):
        assert n == n2 and params == params2 and attrs.keys() == attrs2.keys()
        assert values[0] == values2[0]  # refusal rate: the same texts
        # the KL objective: candidate directions from mean_difference, equal up to float64 round-off
        assert values2[1] == pytest.approx(values[1], rel=1e-9, abs=1e-12)
        for key in attrs:
            assert attrs2[key] == pytest.approx(attrs[key], rel=1e-9, abs=1e-12)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
