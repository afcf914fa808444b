"""Reader of the Fast-dLLM golden runs (`golden_fast_dllm.safetensors`, tests/fixtures/README-fast-dllm.md).

One `GoldenRun` per recorded run: its prompt, kwargs, and per forward the canvas after it, the
window fed to the model (`query_start`, `query_len`), the forward kind (0 full, 1 prefix-cached,
2 dual-cached) and, for four runs per folder, the raw logits.

Example:
    >>> runs = read_runs(FIXTURES / "llada-tiny-gqa")
    >>> runs["prefix_lowconf"].canvas_before(3).shape, runs["prefix_lowconf"].window(3)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import Tensor

FULL, PREFIX, DUAL = 0, 1, 2


@dataclass(frozen=True)
class GoldenRun:
    name: str
    family: str
    mask_id: int
    kwargs: dict
    prompt: Tensor  # [B P]
    output: Tensor  # [B L]
    trajectory: Tensor  # [n B L]: the canvas after each forward's update
    forward_kind: Tensor  # [n]
    query_start: Tensor  # [n]
    query_len: Tensor  # [n]
    block: Optional[Tensor]  # [n], cached samplers only
    logits: dict[int, Tensor]  # {forward: [B query_len V]} raw (Dream: unshifted)

    @property
    def n_forwards(self) -> int:
        return int(self.forward_kind.shape[0])

    def canvas_before(self, k: int) -> Tensor:
        """The canvas forward k read: the initial canvas (prompt + mask ids) for k = 0, else trajectory[k - 1]."""
        if k > 0:
            return self.trajectory[k - 1]
        width = self.output.shape[1] - self.prompt.shape[1]
        return torch.cat([self.prompt, self.prompt.new_full((self.prompt.shape[0], width), self.mask_id)], 1)

    def window(self, k: int) -> tuple[int, int]:
        """Canvas columns [start, stop) fed to the model at forward k."""
        start = int(self.query_start[k])
        return start, start + int(self.query_len[k])


def read_runs(folder: Path) -> dict[str, GoldenRun]:
    """Every run of `folder/golden_fast_dllm.safetensors`, in the recorded order."""
    with safe_open(str(folder / "golden_fast_dllm.safetensors"), "pt") as file:
        meta = file.metadata()
        keys = set(file.keys())
        runs = {}
        for name in json.loads(meta["runs"]):
            def get(field: str) -> Optional[Tensor]:
                key = f"{name}.{field}"
                return file.get_tensor(key) if key in keys else None

            n = int(get("n_forwards")[0])
            runs[name] = GoldenRun(
                name=name, family=meta["family"], mask_id=int(meta["mask_id"]), kwargs=json.loads(meta[f"{name}.kwargs"]),
                prompt=get("prompt"), output=get("output"), trajectory=get("trajectory"),
                forward_kind=get("forward_kind"), query_start=get("query_start"), query_len=get("query_len"),
                block=get("block"), logits={k: get(f"logits.{k}") for k in range(n) if f"{name}.logits.{k}" in keys},
            )
            assert runs[name].n_forwards == n, f"{name}: n_forwards {n} but {runs[name].n_forwards} forward kinds"
    return runs
