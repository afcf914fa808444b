"""Data-parallel plumbing: which batches this process runs, and how the results come back together.

Why: the studies (`mean_difference`, `select_direction`, `sensitivity`, `patch_across_steps`,
`evaluate`, `generate_texts`, the abliteration search) are embarrassingly parallel over prompts
(or grid cells), and users launch them with `torchrun` / `accelerate launch`. Called inside an
initialised `torch.distributed` process group, each of them shards its work here and returns the
full, identical result on every rank; outside one (or in a group of one) every function below is
the identity and runs no collective, so one process computes exactly what it always did.

The rule that makes N processes give the numbers of one: work is cut into the SAME batches as in
one process (never re-batched: a batch's padding and random draws shape its results), batch `b`
runs on rank `b % world_size`, and every batch derives its randomness from its own index or seed,
never from a generator threaded through earlier batches (`check_batch_draws`). Per-item results
are then gathered and put back in order (exact), and streaming sums are added in float64
(`all_reduce_float64`: equal up to float64 round-off, since the additions happen in another order).

Example:
    >>> rank, size = world()                              # (0, 1) without torch.distributed
    >>> mine = my_batches(batches)                        # [(b, batch)] with b % size == rank
    >>> results = gather_records([run(batch) for _, batch in mine], [b for b, _ in mine])
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def _dist():
    """torch.distributed when a process group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when no `torch.distributed` process group is initialised.

    Why: the single place that decides whether a study runs sharded, so that user code is the same
    for 1 and N processes.

    Example:
        >>> rank, size = world()
        >>> if rank == 0: print(result.to_pandas())
    """
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def my_batches(batches: Sequence[T]) -> list[tuple[int, T]]:
    """The (index, batch) pairs this rank runs: batch `b` goes to rank `b % world_size`.

    Why: whole batches, with the boundaries one process uses, keep every batch's padding and random
    draws (and so its outputs) bit for bit; round-robin keeps neighbouring (similar-length) batches
    on different ranks. The index lets a batch derive its own seed and `gather_records` its place.

    Example:
        >>> my_batches(["b0", "b1", "b2"])          # rank 1 of 2: [(1, "b1")]; one process: all three
    """
    rank, size = world()
    return [(b, batch) for b, batch in enumerate(batches) if b % size == rank]


def gather_records(records: Sequence[Any], order: Sequence[int]) -> list:
    """Every rank's `records` (picklable; `order[i]` is the global index of `records[i]`), on every
    rank, sorted by global index.

    Why: per-prompt / per-batch results (texts, metric values, rows) are reassembled exactly, in
    the order one process produces them, so reductions over them (a mean in prompt order) are
    the same operations on the same numbers. An index given twice is an error (two ranks ran the
    same item: the shards were built from different inputs).

    Example:
        >>> mine = my_batches(batches)
        >>> texts = gather_records([generate(b) for _, b in mine], [i for i, _ in mine])
    """
    records, order = list(records), [int(i) for i in order]
    if len(records) != len(order):
        raise ValueError(f"gather_records got {len(records)} records but {len(order)} indices; give one index per record.")
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        parts = [(order, records)]
    else:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (order, records))
    pairs = sorted(((i, r) for indices, recs in parts for i, r in zip(indices, recs)), key=lambda pair: pair[0])
    seen = [i for i, _ in pairs]
    if len(set(seen)) != len(seen):
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise RuntimeError(f"gather_records: indices {twice[:10]} came from more than one rank; every rank must build "
                           "the same list of batches (same prompts and batch_size) before sharding it.")
    return [r for _, r in pairs]


def sharded_map(fn: Callable[[T], Any], items: Sequence[T]) -> list:
    """`[fn(item) for item in items]`, each rank running its share (`my_batches`), gathered on every rank.

    Why: the common case of `my_batches` + `gather_records` when every item is an independent,
    self-seeded unit (a batch, a grid cell); results must be picklable.

    Example:
        >>> values = sharded_map(lambda cell: run_cell(cell), cells)     # the same list on every rank
    """
    mine = my_batches(items)
    return gather_records([fn(item) for _, item in mine], [i for i, _ in mine])


def all_reduce_float64(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The float64 sum of `tensor` over all ranks, on every rank (on `tensor`'s device). None stands
    for "nothing on this rank" (fewer batches than ranks): it adds zeros of the other ranks' shape;
    None on every rank returns None.

    Why: streaming means keep float64 sums and counts; adding the ranks' sums in float64 gives the
    one-process sum up to float64 round-off (the additions are regrouped), far below the float32 of
    the activations, with memory independent of the number of prompts. Counts summed in float64 are
    exact below 2**53.

    Example:
        >>> total = all_reduce_float64(local_sum)              # [d_model] float64, identical on every rank
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return None if tensor is None else tensor.double()
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, None if tensor is None else tuple(tensor.shape))
    known = {s for s in shapes if s is not None}
    if not known:
        return None
    if len(known) > 1:
        raise RuntimeError(f"all_reduce_float64: the ranks hold different shapes {sorted(known)}; every rank must "
                           "reduce the same quantity.")
    device = tensor.device if tensor is not None else torch.device("cpu")
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    work = torch.zeros(known.pop(), dtype=torch.float64, device=backend_device) if tensor is None \
        else tensor.detach().to(backend_device, torch.float64).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(device)


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable), e.g. the parameters of the trial rank 0 asked Optuna for.

    Example:
        >>> params = broadcast_object(trial.params if rank == 0 else None)
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_batch_draws(stochastic: bool, driver: dict, what: str) -> None:
    """Under several ranks, refuse generation whose random draws depend on the batches run before.

    Why: a `generator=` threaded through batches, or a stochastic sampler without `seed=` (the
    global RNG), gives batch `b` the draws left by batches 0..b-1; on another rank those were never
    drawn, so the numbers would differ from one process. With `seed=` every batch starts its own
    generator. Nothing is checked in one process (its results stay as they were).

    Example:
        >>> check_batch_draws(sampler.stochastic(), driver, "sensitivity")   # ValueError under torchrun without seed=
    """
    if world()[1] == 1:
        return
    if driver.get("generator") is not None:
        raise ValueError(f"{what} under {world()[1]} processes: generate_kwargs has generator=, which threads random "
                         "draws through the batches, so a rank cannot reproduce what one process draws. Pass seed= "
                         "instead (every batch then starts its own generator).")
    if stochastic and driver.get("seed") is None:
        raise ValueError(f"{what} under {world()[1]} processes: the sampler samples (temperature > 0) but no seed= was "
                         "given, so each batch draws from the global RNG in the order batches run. Pass seed= in "
                         "generate_kwargs.")


__all__ = ["all_reduce_float64", "broadcast_object", "check_batch_draws", "gather_records", "my_batches",
           "sharded_map", "world"]
