"""Shared helpers for the adapter parity tests (issue 4): compare our activations with upstream goldens."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

ATOL = RTOL = 1e-4


def assert_pairs_close(pairs: dict, golden: dict, *, atol: float = ATOL) -> float:
    """Assert every (upstream name -> our tensor) pair matches the golden tensor; return the max error."""
    worst = 0.0
    for name, ours in pairs.items():
        expected = golden[name]
        assert ours.shape == expected.shape, f"{name}: ours {tuple(ours.shape)}, golden {tuple(expected.shape)}"
        torch.testing.assert_close(ours, expected, atol=atol, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, (ours - expected).abs().max().item())
    return worst


def ln_out(cache, name: str, module) -> torch.Tensor:
    """A norm's output (normalised input times weight) from its cached `hook_normalized`."""
    return cache[f"{name}.hook_normalized"] * module.weight


def run_metadata(path) -> dict:
    """The safetensors metadata of a golden file, with `<run>.kwargs` decoded from JSON."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    return {key: json.loads(value) if key.endswith(".kwargs") else value for key, value in meta.items()}


def capture_module_outputs(model, modules: dict):
    """Register plain PyTorch forward hooks on `{label: module}`; returns (store, handles)."""
    store, handles = {}, []
    for label, module in modules.items():
        handles.append(module.register_forward_hook(lambda mod, args, out, label=label: store.__setitem__(label, out)))
    return store, handles
