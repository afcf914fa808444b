"""TransformerLens' `ActivationCache`, with a clear error where a mixture-of-experts layer has no
neuron view."""

from __future__ import annotations

from typing import Iterable, Optional

from transformer_lens import ActivationCache


class DiffusionActivationCache(ActivationCache):
    """Every TransformerLens analysis method unchanged; `get_neuron_results` / `stack_neuron_results`
    (and `get_full_resid_decomposition`, which calls them) refuse mixture-of-experts layers with a
    sentence instead of `KeyError: 'blocks.0.mlp.hook_post'`.

    Why: each expert sees only its routed tokens, so an MoE layer has no [batch pos d_mlp] neurons.

    Example:
        >>> logits, cache = moe_model.run_with_cache(tokens)
        >>> cache.get_full_resid_decomposition(expand_neurons=False)  # one row per MLP works on MoE
    """

    def get_neuron_results(self, layer: int, *args, **kwargs):
        self._require_dense_mlps([layer % self.model.cfg.n_layers])
        return super().get_neuron_results(layer, *args, **kwargs)

    def stack_neuron_results(self, layer: Optional[int], *args, **kwargs):
        n_layers = self.model.cfg.n_layers
        self._require_dense_mlps(range(n_layers if layer in (None, -1) else layer))
        return super().stack_neuron_results(layer, *args, **kwargs)

    def _require_dense_mlps(self, layers: Iterable[int]) -> None:
        moe = [layer for layer in layers if layer in self.model.cfg.moe_layers]
        if moe:
            raise ValueError(
                f"Block(s) {moe} have a mixture-of-experts MLP: each expert sees only its routed tokens, so "
                "there is no [batch pos d_mlp] neuron view. Use get_full_resid_decomposition(expand_neurons="
                "False) (one row per MLP), or per expert cache['blocks.{l}.mlp.experts.{e}.hook_post'] with "
                "model.blocks[l].mlp.experts[e].W_out."
            )
