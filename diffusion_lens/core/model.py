"""`HookedDiffusionCore`: embed -> blocks -> ln_final -> unembed, hook points everywhere.

The forward is the same for every family; what differs is in `DiffusionConfig`. Hooks use the
TransformerLens machinery (`HookedRootModule`, `HookPoint`, `ActivationCache`), so TransformerLens
hook functions, filters and cache analysis work unchanged.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from copy import deepcopy
from typing import Callable, Optional, Sequence, Union, no_type_check

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.activation_cache import DiffusionActivationCache
from diffusion_lens.core.components import (
    RMSNorm, SelfConditioning, attention_masks_for, build_block, layer_rotaries, position_ids_for,
)
from diffusion_lens.core.components.errors import KeepPropertyErrors
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.core.hook_lists import HookName, flatten_hooks, is_glob, name_filter, no_match_message
from diffusion_lens.core.kv_cache import KVCache

TextInput = Union[str, Sequence[str]]
TokensInput = Union[TextInput, Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
HookList = Sequence[tuple[Union[str, Callable[[str], bool]], Callable]]


class HookedDiffusionCore(KeepPropertyErrors, HookedRootModule):
    """The hookable forward of a masked-diffusion transformer: a TransformerLens hook point on every activation.

    Everything that needs no sampler and no checkpoint lives here (forward, hooks, caches, weight
    views, tokens); `diffusion_lens.HookedDiffusionTransformer` subclasses it and adds denoising
    (`generate`, `run_with_cache(step=)`) and checkpoints (`from_pretrained`, `save_pretrained`).

    `cfg` is the model's own copy: `cfg.dtype` and `cfg.device` follow `.to()`, `.half()`, `.cuda()`
    and `load_state_dict(..., assign=True)`, as TransformerLens code reading them expects.

    Gradients: weights come frozen from `from_pretrained`, yet activations require grad (under
    grad mode) whenever a backward hook is installed (`add_hook(..., dir="bwd")`, `bwd_hooks=`,
    `run_with_cache(incl_bwd=True)`) or inside `with model.activation_grads():`, so attribution works
    without unfreezing anything. Otherwise a forward builds no graph, as before, and under
    `torch.no_grad()` (e.g. `generate`) nothing changes.

    Example:
        >>> model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
        >>> logits, cache = model.run_with_cache("Hello", names_filter="blocks.0.hook_resid_post")
        >>> cache["blocks.0.hook_resid_post"].shape  # [batch pos d_model]
    """

    # Most bytes of CPU tensors `run_with_cache` keeps from one call to the next (`_hold_cache`); 0 keeps none.
    held_cache_max_bytes = 128 * 2**20

    def __init__(self, cfg: DiffusionConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg = deepcopy(cfg)  # its dtype / device track this model's weights
        self._activation_grad_requests = 0  # open `activation_grads()` contexts
        self._held_cache: dict[str, list[Tensor]] = {}  # the last run_with_cache's tensors (`_hold_cache`)
        self.tokenizer = tokenizer
        # the checkpoint family's adapter (`diffusion_lens.checkpoints.ModelAdapter`), set by
        # `from_pretrained`; `save_pretrained` writes its format and `generate` runs its sampler
        self.adapter = None
        # checkpoint tensors this model does not use, kept as stored for save_pretrained (the adapter's
        # `carried_checkpoint_keys`, e.g. a vision tower): checkpoint key -> tensor
        self.carried_tensors: dict[str, Tensor] = {}
        self.rotaries = layer_rotaries(cfg)  # one per layer, shared by layers with the same RoPE
        self.rotary = self.rotaries[0]  # every layer's, unless cfg.layer_rope differs per layer
        self.embed = nn.Embedding(cfg.d_vocab_out, cfg.d_model)
        # [batch pos d_model], after cfg.embed_scale; in cfg.self_conditioning_pass the blocks read the
        # conditioned input instead (blocks.0.hook_resid_pre)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(build_block(cfg, layer, self.rotaries[layer]) for layer in range(cfg.n_layers))
        if cfg.self_conditioning_pass is not None:  # the pass input's MLP (cfg.self_conditioning_pass)
            self.self_conditioning = SelfConditioning(cfg)
        self.ln_final = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
        # [batch pos d_model] what the LM head reads: ln_final's output (its weight applied)
        self.hook_unembed_in = HookPoint()
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab_out, bias=False)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        self.setup()
        for point in self.hook_dict.values():  # `hook.state`: the DenoisingState during generate, else None
            point.state = None
            point.pass_name = cfg.default_pass  # the pass running (`_publish_pass`); None on one-pass models
        self._published_pass = cfg.default_pass
        if self.embed.weight.dtype != cfg.dtype:
            self.to(cfg.dtype)
        self._sync_cfg()

    # ------------------------------------------------------------------ cfg.dtype / cfg.device follow the weights
    def _sync_cfg(self) -> None:
        self.cfg.dtype = self.embed.weight.dtype
        self.cfg.device = str(self.embed.weight.device)

    def _apply(self, fn, recurse=True):
        """Every `.to()`, `.cuda()`, `.half()`, `.float()` ... ends here; keep `cfg` truthful."""
        out = super()._apply(fn, recurse)
        self._sync_cfg()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`; with `assign=True` the tensors' dtype / device become the model's."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_cfg()
        return result

    # ------------------------------------------------------------------ forward
    @no_type_check  # takes text or tokens and explains a wrong input itself; `_logits` has the checked shapes
    def forward(
        self,
        input: TokensInput,
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
        *,
        position_ids: Optional[Int[Tensor, "batch pos"]] = None,
        return_type: Optional[str] = "logits",
        targets: Optional[Int[Tensor, "batch pos"]] = None,
        loss_weights: Optional[Float[Tensor, "batch pos"]] = None,
        kv_cache: Optional[KVCache] = None,
        window_start: int = 0,
        pass_name: Optional[str] = None,
        self_conditioning_logits: Optional[Float[Tensor, "batch pos d_vocab"]] = None,
        attention_block_size: Optional[int] = None,
        attention_block_offsets: Optional[Int[Tensor, " batch"]] = None,
    ) -> Union[Float[Tensor, "batch pos d_vocab"], Float[Tensor, ""], None]:
        """One denoising forward over a canvas.

        Returns raw logits per residual position [batch pos d_vocab_out]; for families with
        `cfg.logit_shift` use `model.token_logits(logits)` to get the prediction for each token.
        `attention_mask` [batch pos] (1 = real token) is applied per `cfg.attention_mask_mode`; without
        `position_ids`, RoPE positions are 0..pos-1, or renumbered from the mask where
        `cfg.position_ids_mode == "renumber_padded"` (Dream).
        `return_type="loss"` gives the masked-diffusion loss: cross-entropy of `targets` at the
        positions holding the mask token, weighted by `loss_weights` (e.g. 1/t in LLaDA's SFT
        objective) and averaged over those positions. `return_type=None` runs every hook point and skips
        only the LM head (the [pos d_vocab] product): a forward run for its KV cache or its activations.
        With `kv_cache=` (a `KVCache` of the whole canvas) the input is a window of the canvas,
        columns [window_start, window_start + pos): only those positions are computed (the hook
        points see them alone), their keys and values are written into the cache and every other
        column's are read from it; logits are the window's. `window_start=0` with the whole canvas
        fills the cache. There `attention_mask` and `position_ids` cover the whole canvas
        ([batch cache.n_pos], as for the forward that filled the cache): queries are the window's
        canvas columns, keys every column, and each layer's mask is its attention kind AND the
        padding mask.
        `pass_name` picks one of the config's passes (`cfg.layer_scalar_passes`; None runs
        `cfg.default_pass`): its layer scalars and its attention kinds (`cfg.attention_kinds`). Every
        hook point carries the pass running as `hook.pass_name` (None on a one-pass model), so a hook
        scheduled with `H.at(..., passes=)` selects by pass in plain forwards as in `generate`.
        `self_conditioning_logits` [batch pos d_vocab] (the previous step's) feed the
        self-conditioning of `cfg.self_conditioning_pass`; None there means no signal.
        `attention_block_size` (a block-diffusion sampler's block length, LLaDA2's `block_length`)
        makes attention block-causal: bidirectional inside blocks of that many canvas columns,
        counted from column 0 (prompt included), causal across blocks, ANDed with the padding mask;
        None keeps the config's attention (bidirectional for LLaDA2, as its plain forward).
        `attention_block_offsets` [batch] anchors each row's blocks at its own column instead (block of
        column c = (c - offset) // size; a left-padded row's first real token, so it is cut into blocks as
        its unpadded run is).

        Example (DiffusionGemma: a prompt, then one block's decoder step over a cache of the prompt
        and n_blocks canvases; masks cover the whole cache, 1 = real):
            >>> cache = KVCache.empty(model.cfg, batch=1, n_pos=P + n_blocks * C, like=model.W_E)
            >>> _ = model(prompt, mask, kv_cache=cache, pass_name="encoder")        # columns [0, P)
            >>> logits = model(canvas, mask, kv_cache=cache, window_start=P, pass_name="decoder",
            ...                self_conditioning_logits=previous)                  # [1 C vocab]
        """
        if return_type not in ("logits", "loss", None):
            raise ValueError(f"return_type must be 'logits', 'loss' or None, got {return_type!r}")
        tokens = self._as_tokens(input)
        self._check_tokens(tokens)
        if kv_cache is not None:
            self._check_window(tokens, attention_mask, position_ids, kv_cache, window_start)
        elif attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have shape "
                f"{tuple(tokens.shape)}; pass one 0/1 entry per token."
            )
        pass_name = self.cfg.resolve_pass(pass_name)
        self._check_self_conditioning(tokens, pass_name, self_conditioning_logits)
        self._publish_pass(pass_name)
        logits = self._logits(tokens, attention_mask, position_ids, kv_cache, window_start, pass_name,
                              self_conditioning_logits, unembed=return_type is not None,
                              attention_block_size=attention_block_size, attention_block_offsets=attention_block_offsets)
        if return_type == "logits":
            return logits
        if return_type == "loss":
            return self.masked_diffusion_loss(logits, tokens, targets, loss_weights)
        return None

    def _logits(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Optional[Shaped[Tensor, "batch k_pos"]],
        position_ids: Optional[Int[Tensor, "batch k_pos"]],
        kv_cache: Optional[KVCache] = None,
        window_start: int = 0,
        pass_name: Optional[str] = None,
        self_conditioning_logits: Optional[Float[Tensor, "batch pos d_vocab"]] = None,
        unembed: bool = True,
        attention_block_size: Optional[int] = None,
        attention_block_offsets: Optional[Int[Tensor, " batch"]] = None,
    ) -> Optional[Float[Tensor, "batch pos d_vocab"]]:
        """embed -> blocks -> ln_final -> unembed on checked tokens: every hook point fires below here.

        `tokens` are canvas columns [window_start, window_start + pos); `attention_mask` and
        `position_ids` cover every key column (the whole canvas: the input, or the cache's columns).
        `pass_name` is resolved (`cfg.resolve_pass`). `unembed=False` returns None after
        `hook_unembed_in` (no LM head). `attention_block_size` / `attention_block_offsets` as in `forward`.
        """
        queries = range(window_start, window_start + tokens.shape[1])
        n_keys = tokens.shape[1] if kv_cache is None else kv_cache.n_pos
        masks = attention_masks_for(self.cfg, attention_mask, queries, n_keys, tokens.device,
                                    self.cfg.attention_kinds(pass_name), attention_block_size, attention_block_offsets)
        if position_ids is None:  # renumbers padded rows where cfg.position_ids_mode asks for it
            position_ids = position_ids_for(self.cfg, attention_mask)
        tables: dict[int, tuple[Tensor, Tensor]] = {}  # per distinct Rotary (cfg.layer_rope)
        for rotary in self.rotaries:
            if id(rotary) in tables:
                continue
            if position_ids is None:  # RoPE at the canvas columns, from the tables cached per canvas length
                cos, sin = rotary.tables(n_keys, tokens.device)
                tables[id(rotary)] = (cos[queries.start : queries.stop], sin[queries.start : queries.stop])
            else:
                tables[id(rotary)] = rotary.tables(
                    tokens.shape[1], tokens.device, position_ids[:, queries.start : queries.stop])
        embedded = self.embed(tokens)
        if self.cfg.embed_scale is not None:  # the scale cast to the weights' dtype first, as Gemma does
            embedded = embedded * embedded.new_tensor(self.cfg.embed_scale)
        if not embedded.requires_grad and torch.is_grad_enabled() and self._activation_grads_requested():
            embedded.requires_grad_(True)  # every later activation is then differentiable
        resid = self.hook_embed(embedded)
        if pass_name is not None and pass_name == self.cfg.self_conditioning_pass:
            resid = self.self_conditioning(resid, self_conditioning_logits, self.embed.weight)
        per_pass = {} if pass_name is None else {"pass_name": pass_name}  # gemma4 blocks only (cfg._validate)
        for layer, block in enumerate(self.blocks):
            kv = None if kv_cache is None else kv_cache.layer(layer)
            resid = block(resid, masks[layer], tables[id(self.rotaries[layer])], kv, window_start, **per_pass)
        final = self.hook_unembed_in(self.ln_final(resid))
        if not unembed:
            return None
        logits = self.unembed(final)
        if self.cfg.logits_in_fp32:
            logits = logits.float()
        if self.cfg.final_logit_softcap is not None:
            cap = self.cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _publish_pass(self, pass_name: Optional[str]) -> None:
        """Set `hook.pass_name` on every hook point when the forward's pass differs from the last one's."""
        if pass_name != self._published_pass:
            for point in self.hook_dict.values():
                point.__dict__["pass_name"] = pass_name  # plain attribute: skips nn.Module.__setattr__
            self._published_pass = pass_name

    def _check_self_conditioning(self, tokens: Tensor, pass_name: Optional[str], logits: Optional[Tensor]) -> None:
        """Self-conditioning logits need the pass that reads them, and one row per token."""
        if logits is None:
            return
        if self.cfg.self_conditioning_pass is None or pass_name != self.cfg.self_conditioning_pass:
            raise ValueError(
                f"self_conditioning_logits are read only by the self-conditioning pass "
                f"(cfg.self_conditioning_pass={self.cfg.self_conditioning_pass!r}); this forward runs pass "
                f"{pass_name!r}. Pass pass_name={self.cfg.self_conditioning_pass!r}, or drop the logits."
            )
        expected = (*tokens.shape, self.cfg.d_vocab_out)
        if tuple(logits.shape) != expected:
            raise ValueError(f"self_conditioning_logits have shape {list(logits.shape)}; the input needs "
                             f"[batch pos d_vocab] = {list(expected)} (the previous step's logits of these tokens).")

    def _check_window(self, tokens: Tensor, attention_mask, position_ids, kv_cache: KVCache, window_start: int) -> None:
        """A windowed forward must fit its cache, and its mask / positions must cover the whole canvas."""
        if len(kv_cache.keys) != self.cfg.n_layers or kv_cache.batch != tokens.shape[0]:
            raise ValueError(
                f"The KVCache holds {len(kv_cache.keys)} layers x batch {kv_cache.batch}; this model has "
                f"{self.cfg.n_layers} layers and the input batch {tokens.shape[0]}. Build it with KVCache.empty(model.cfg, ...)."
            )
        if window_start < 0 or window_start + tokens.shape[1] > kv_cache.n_pos:
            raise ValueError(
                f"The window [{window_start}, {window_start + tokens.shape[1]}) does not fit the cache's "
                f"{kv_cache.n_pos} canvas positions."
            )
        canvas = (kv_cache.batch, kv_cache.n_pos)
        for name, given in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if given is not None and tuple(given.shape) != canvas:
                raise ValueError(
                    f"With kv_cache= {name} covers the whole canvas, shape [batch n_pos] = {list(canvas)} "
                    f"(the cache's columns, keys included), but it has shape {list(given.shape)}; one of the "
                    "window's shape would leave the other columns unknown. Pass the canvas's own, e.g. "
                    f"model(canvas[:, s:e], {name}=canvas_{name}, kv_cache=cache, window_start=s)."
                )

    def _check_tokens(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Fail before the run, with a sentence, on an empty input, an input longer than the model's
        context, or ids outside the embedding (cost: one min/max reduction)."""
        if tokens.numel() == 0:
            raise ValueError(
                f"The input holds no tokens (shape {tuple(tokens.shape)}); a forward needs at least one "
                "row with at least one token id."
            )
        n_ctx = self.cfg.n_ctx
        if n_ctx is not None and tokens.shape[1] > n_ctx:
            raise ValueError(
                f"The input has {tokens.shape[1]} positions but this model's context is cfg.n_ctx={n_ctx}; "
                "shorten the prompt or the response (gen_length)."
            )
        low, high = torch.stack(torch.aminmax(tokens)).tolist()
        n_embed = self.cfg.d_vocab_out
        if low < 0 or high >= n_embed:
            bad = low if low < 0 else high
            row, pos = (tokens == bad).nonzero()[0].tolist()
            raise ValueError(
                f"Token id {bad} (row {row}, position {pos}) is outside the vocabulary: this model embeds "
                f"ids 0..{n_embed - 1}. Were these ids made by another model's tokenizer?"
            )

    def _activation_grads_requested(self) -> bool:
        return self._activation_grad_requests > 0 or any(point._backward_hooks for point in self.hook_dict.values())

    @contextmanager
    def activation_grads(self):
        """Inside, activations require grad under grad mode while the weights stay frozen.

        Why: `from_pretrained` freezes the weights, so without this a forward builds no graph and
        `act.retain_grad()` or `torch.autograd.grad(metric, acts)` fail. Backward hooks and
        `run_with_cache(incl_bwd=True)` turn this on by themselves.

        Example:
            >>> kept = {}
            >>> def keep(act, hook):
            ...     act.retain_grad(); kept[hook.name] = act
            >>> with model.activation_grads():
            ...     logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", keep)])
            ...     logits[0, -1, 5].backward()
            >>> kept["blocks.0.hook_resid_post"].grad.shape  # [batch pos d_model]
        """
        self._activation_grad_requests += 1
        try:
            yield self
        finally:
            self._activation_grad_requests -= 1

    def token_logits(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Per-token predictions from per-residual-position logits: the one place the logit shift lives.

        With `cfg.logit_shift == 1` (Dream), token j is predicted by residual position j-1, and
        position 0 reuses its own row (it is never masked in practice). Otherwise identity.
        """
        if not self.cfg.logit_shift:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def masked_diffusion_loss(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        targets: Optional[Int[Tensor, "batch pos"]],
        loss_weights: Optional[Float[Tensor, "batch pos"]] = None,
    ) -> Float[Tensor, ""]:
        """Cross-entropy of the clean `targets` at masked positions, optionally weighted."""
        if targets is None or targets.shape != tokens.shape:
            raise ValueError(
                "return_type='loss' needs targets: the clean tokens, same shape as the input "
                f"({tuple(tokens.shape)}); got {None if targets is None else tuple(targets.shape)}."
            )
        masked = tokens == self.cfg.mask_token_id
        if not masked.any():
            raise ValueError(f"No position holds the mask token {self.cfg.mask_token_id}; nothing to predict.")
        predicted = self.token_logits(logits)[masked].float()
        loss = F.cross_entropy(predicted, targets[masked], reduction="none")
        if loss_weights is not None:
            loss = loss * loss_weights[masked]
        return loss.mean()

    # ------------------------------------------------------------------ hooks and caching
    def check_hook_names(self, names: Sequence[str]) -> None:
        """Raise a KeyError naming each unknown hook point with the closest real names."""
        unknown = [name for name in names if name not in self.hook_dict]
        if unknown:
            lines = []
            for name in unknown:
                close = difflib.get_close_matches(name, self.hook_dict.keys(), n=3, cutoff=0.6)
                lines.append(f"{name!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(name))
            raise KeyError(
                "Unknown hook point " + "; ".join(lines) + ". See `model.hook_dict` for all names."
            )

    def hook_names(self, names_filter: NamesFilter = None) -> list[str]:
        """Hook point names selected by a names filter: None (all), a name, a glob
        ("blocks.*.hook_resid_post", as in `H.at`), a list of those, or a callable of the name.

        Why: a typo must fail, not give an empty cache or a hook that never runs, so a name that
        is not a hook point, or a glob / callable that selects none, raises a KeyError.

        Example:
            >>> model.hook_names("blocks.*.hook_resid_post")
            ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post', ...]
        """
        if names_filter is None:
            return list(self.hook_dict)
        items = [names_filter] if isinstance(names_filter, str) or callable(names_filter) else list(names_filter)
        bad = [item for item in items if not (isinstance(item, str) or callable(item))]
        if bad:
            raise TypeError(f"A names filter holds hook names, globs or callables; got {bad[0]!r}.")
        self.check_hook_names([item for item in items if isinstance(item, str) and not is_glob(item)])
        out: list[str] = []
        for item in items:
            if isinstance(item, str) and not is_glob(item):
                out.append(item)
                continue
            selects = name_filter(item)
            matched = [name for name in self.hook_dict if selects(name)]
            if not matched:
                raise KeyError(no_match_message(selects, self.hook_dict))
            out.extend(matched)
        return list(dict.fromkeys(out))

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        """TransformerLens `add_hook`; `name` may also be a glob, and a name, glob or filter that
        selects no hook point raises a KeyError, and so does a scheduled hook (`H.at`) naming a pass
        this model does not run."""
        self._check_hook(name, hook)
        super().add_hook(name_filter(name), hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def remove_all_hook_fns(self, direction="both", including_permanent=False, level=None):
        # Same as TransformerLens, but skips hook points holding no hooks: walking all of them cost
        # ~0.25 ms per `with model.hooks(...)` on a 4-layer model, 1% of its forward.
        for hp in self.hook_dict.values():
            if hp.fwd_hooks or hp.bwd_hooks:
                hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def hooks(self, fwd_hooks: HookList = (), bwd_hooks: HookList = (), reset_hooks_end=True, clear_contexts=False):
        """Context manager adding temporary hooks, removed on exit even if the body raises.

        `fwd_hooks` / `bwd_hooks`: a `(name, fn)` pair, a list of pairs or nested lists of them
        (e.g. `[ablate(model, r), add(model, v, layers=1), H.at(...)]`); names may be globs. Every
        name is checked before any hook is added (`hook_names`: a typo or an empty match raises).
        `run_with_hooks` goes through here, so it accepts the same.

        Example:
            >>> with model.hooks(fwd_hooks=[ablate(model, r), ("blocks.*.hook_resid_post", fn)]):
            ...     logits = model(tokens)
        """
        fwd, bwd = flatten_hooks(fwd_hooks, "fwd_hooks"), flatten_hooks(bwd_hooks, "bwd_hooks")
        for name, fn in [*fwd, *bwd]:
            self._check_hook(name, fn)
        return super().hooks(fwd, bwd, reset_hooks_end, clear_contexts)

    def _check_hook(self, name: HookName, fn) -> None:
        """Raise before installing when `name` selects no hook point or a scheduled hook (`H.at`, which
        keeps its request as `fn.schedule`) names a pass this model does not run."""
        self.hook_names(name)
        check_passes = getattr(getattr(fn, "schedule", None), "check_passes", None)
        if check_passes is not None:
            check_passes(self.cfg.layer_scalar_passes)

    def run_with_cache(
        self,
        *model_args,
        names_filter: NamesFilter = None,
        device: Optional[Union[str, torch.device]] = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        **model_kwargs,
    ) -> tuple[Optional[Tensor], ActivationCache]:
        """Run a forward and return (output, `ActivationCache`) of the hook points in `names_filter`.

        `names_filter`: a name, a glob ("blocks.*.hook_resid_post"), a list of those or a callable
        (see `hook_names`; one that selects no hook point raises instead of caching nothing).

        Example:
            >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
            >>> cache.accumulated_resid(apply_ln=True).shape  # [layer+1 batch pos d_model]

        `incl_bwd=True` (TransformerLens) also backpropagates from the output, which must then be the
        scalar of `return_type="loss"`, and caches each gradient as `"<name>_grad"`; frozen weights
        need no unfreezing (see the class docstring).
            >>> loss, cache = model.run_with_cache(noisy, return_type="loss", targets=clean, incl_bwd=True)
            >>> cache["blocks.0.hook_resid_post_grad"].shape  # [batch pos d_model]

        Memory: the model keeps the last cache's CPU tensors (and output), up to
        `held_cache_max_bytes` (128 MiB), until the next call caches the same points, so a dropped
        cache's memory is reused rather than faulted in afresh (see `_hold_cache`); set
        `model.held_cache_max_bytes = 0` to free a dropped cache at once.
        """
        if incl_bwd:
            self._check_incl_bwd(model_kwargs)
        names = self.hook_names(names_filter)
        if remove_batch_dim and model_args and isinstance(model_args[0], Tensor) and model_args[0].ndim > 1:
            if model_args[0].shape[0] != 1:
                raise ValueError(f"remove_batch_dim=True needs a batch of 1, got {model_args[0].shape[0]}.")
        store: dict[str, Tensor] = {}
        held, self._held_cache = self._held_cache, {}  # the last call's tensors, let go of one by one below

        def save(act: Tensor, hook: HookPoint) -> None:
            act = act.detach() if device is None else act.detach().to(device)
            store[hook.name] = act[0] if remove_batch_dim else act
            held.pop(hook.name, None)

        def save_grad(grad: Tensor, hook: HookPoint) -> None:
            grad = grad.detach() if device is None else grad.detach().to(device)
            store[hook.name + "_grad"] = grad[0] if remove_batch_dim else grad
            held.pop(hook.name + "_grad", None)

        bwd_hooks = [(name, save_grad) for name in names] if incl_bwd else []
        with self.hooks(fwd_hooks=[(name, save) for name in names], bwd_hooks=bwd_hooks):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        held.clear()  # the points this call did not cache
        self._hold_cache(store, out)
        return out, DiffusionActivationCache(store, self, has_batch_dim=not remove_batch_dim)

    def _hold_cache(self, store: dict[str, Tensor], out: Optional[Tensor]) -> None:
        """Keep a reference to this call's CPU tensors until the next `run_with_cache` caches the same
        hook point (the output goes with the point that fired last); nothing is ever written into them.

        Why: with glibc's default malloc settings, a cache of tens of MB freed at once goes back to
        the OS and the next call page-faults it all in again (12k faults a call, ~1.5x a forward on
        a 4-layer d_model-256 model). Freed one tensor at a time as its replacement is made, the same
        memory serves the next allocations instead. Costs at most `held_cache_max_bytes` of memory
        held after the cache is dropped; GPU caches are not held (the CUDA allocator already reuses).

        Example:
            >>> _, cache = model.run_with_cache(tokens); del cache  # its tensors live on, held
            >>> _, cache = model.run_with_cache(tokens)  # ...and are let go of as this cache fills
        """
        held = {name: [t] for name, t in store.items() if t.device.type == "cpu"}
        if held and isinstance(out, Tensor) and out.device.type == "cpu":
            held[next(reversed(held))].append(out.detach())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ts in held.values() for t in ts}
        self._held_cache = held if sum(storages.values()) <= self.held_cache_max_bytes else {}

    def _check_incl_bwd(self, model_kwargs: dict) -> None:
        if model_kwargs.get("return_type", "logits") != "loss":
            raise ValueError(
                "incl_bwd=True backpropagates from the output, which must be a scalar: pass "
                "return_type='loss' with targets=..., or for a metric of the logits use "
                "`with model.hooks(bwd_hooks=[(name, fn)]): metric(model(tokens)).backward()`."
            )
        if not torch.is_grad_enabled():
            raise ValueError("incl_bwd=True needs gradients, but grad mode is off here (torch.no_grad / inference_mode).")

    def set_use_attn_result(self, use: bool) -> None:
        """Compute each head's output separately so `attn.hook_result` [batch pos head d_model] fires.
        Costs memory proportional to n_heads x d_model per position; off by default."""
        for block in self.blocks:
            block.attn.use_attn_result = use

    def block_devices(self) -> list[torch.device]:
        """The device each block computes on: accelerate's execution device when `from_pretrained(...,
        device_map=)` dispatched it (a disk- or CPU-offloaded block runs on the main device), else its
        weights' device. Per-layer state such as a KV cache must live there.

        Example:
            >>> model.block_devices()        # [device('cuda:0'), ..., device('cuda:1')] under device_map="auto"
        """
        out = []
        for block in self.blocks:
            device = getattr(getattr(block, "_hf_hook", None), "execution_device", None)
            out.append(torch.device(device) if device is not None else next(block.parameters()).device)
        return out

    # ------------------------------------------------------------------ weight views (TransformerLens shapes)
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.weight.T

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack_attn("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack_attn("W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack_attn("W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack_attn("W_O")

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        """Linear ("up") branch of the gated MLP."""
        return torch.stack([self._dense_mlp(layer).up_proj.weight.T for layer in range(self.cfg.n_layers)])

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        """Gate branch (the one the activation is applied to)."""
        return torch.stack([self._dense_mlp(layer).gate_proj.weight.T for layer in range(self.cfg.n_layers)])

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return torch.stack([self._dense_mlp(layer).down_proj.weight.T for layer in range(self.cfg.n_layers)])

    # Biases (TransformerLens shapes): real values where the family has them (Dream's q/k/v), zeros
    # elsewhere, so TransformerLens formulas such as `x @ W_Q + b_Q` hold for every family.
    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack_attn("b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack_attn("b_K")

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack_attn("b_V")

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return torch.stack([block.attn.b_O for block in self.blocks])

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return torch.stack([self._dense_mlp(layer).b_in for layer in range(self.cfg.n_layers)])

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return torch.stack([self._dense_mlp(layer).b_out for layer in range(self.cfg.n_layers)])

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, " d_model"]:
        """Sum of the constant terms (attention `b_O`, MLP `b_out`) written to the residual stream
        before block `layer` (plus that block's `b_O` with `mlp_input=True`), as in TransformerLens;
        `cache.get_full_resid_decomposition()` reads it.

        Example:
            >>> model.accumulated_bias(2).shape   # [d_model]; zeros for bias-free families (LLaDA)
        """
        if not 0 <= layer <= self.cfg.n_layers or (mlp_input and layer == self.cfg.n_layers):
            raise ValueError(f"layer={layer} must be in 0..{self.cfg.n_layers - (1 if mlp_input else 0)}.")
        total = torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype, device=self.cfg.device)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O
            if include_mlp_biases:
                total = total + block.mlp.b_out
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    def _stack_attn(self, name: str) -> Tensor:
        """Every layer's `attn.<name>` stacked [n_layers ...], or advice where head dims differ per layer."""
        if len({self.cfg.head_dim(layer) for layer in range(self.cfg.n_layers)}) > 1:
            raise AttributeError(
                f"The layers of this model have different head dims ({self.cfg.layer_head_dims}), so their {name} "
                f"do not stack into one [n_layers ...] tensor; use model.blocks[l].attn.{name} per layer."
            )
        return torch.stack([getattr(block.attn, name) for block in self.blocks])

    def _dense_mlp(self, layer: int) -> nn.Module:
        mlp = self.blocks[layer].mlp
        if hasattr(mlp, "dense"):  # Gemma-4 layout: a dense MLP beside the experts
            raise AttributeError(
                f"Block {layer} runs a dense MLP and a mixture of experts in parallel, so there is no single "
                f"W_in/W_gate/W_out; use model.blocks[{layer}].mlp.dense or .mlp.experts.gate_up_proj / .down_proj."
            )
        if not hasattr(mlp, "up_proj"):
            raise AttributeError(
                f"Block {layer} has a mixture-of-experts MLP, so there is no single W_in/W_gate/W_out; "
                f"use model.blocks[{layer}].mlp.experts[e] instead."
            )
        return mlp

    def tokens_to_residual_directions(self, tokens) -> Float[Tensor, "... d_model"]:
        """Residual-stream direction whose dot product with ln_final's *normalised* input gives the
        logit: W_U[:, token] scaled by ln_final's weight (which we keep unfolded)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return (self.W_U * self.ln_final.weight[:, None])[:, tokens].movedim(0, -1)

    # ------------------------------------------------------------------ tokenization
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer (its folder held no tokenizer files); pass token ids "
                "as a tensor, or set model.tokenizer = transformers.AutoTokenizer.from_pretrained(...)."
            )
        return self.tokenizer

    @no_type_check  # checks its own input and explains a wrong one (the test suite's shape checks skip it)
    def _as_tokens(self, input: TokensInput) -> Int[Tensor, "batch pos"]:
        if isinstance(input, Tensor):
            if input.dtype not in (torch.int64, torch.int32):
                if input.numel() == 0:  # torch.tensor([]) is float
                    raise ValueError(f"The input holds no token ids (an empty tensor of shape {tuple(input.shape)}).")
                raise TypeError(f"Token ids must be an integer tensor, got {input.dtype}.")
            tokens = input if input.ndim == 2 else input[None]
            if tokens.ndim != 2:
                raise ValueError(f"Token ids must be [batch pos] or [pos], got shape {tuple(input.shape)}.")
            return tokens.to(self.embed.weight.device)
        return self.to_tokens(input)

    def chat_text(self, prompt: str) -> str:
        """The prompt rendered with the checkpoint's chat template as one user turn."""
        tokenizer = self._require_tokenizer()
        if not tokenizer.chat_template:
            raise ValueError("The tokenizer has no chat template; call with chat=False for a base model.")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def to_tokens(
        self, text: TextInput, *, chat: bool = False, return_attention_mask: bool = False
    ) -> Union[Int[Tensor, "batch pos"], tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]:
        """Tokenize one string or a batch (left-padded with the pad token, as the samplers expect).

        `chat=True` renders each string as a user turn with the chat template first. Special tokens
        come from the template only (`add_special_tokens=False`), as in the reference samplers.
        """
        tokenizer = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError(
                "The input is an empty list of prompts; pass a string, a non-empty list of strings, "
                "or a [batch pos] tensor of token ids."
            )
        if chat:
            texts = [self.chat_text(t) for t in texts]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = self.cfg.pad_token_id
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        device = self.embed.weight.device
        tokens, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        return (tokens, mask) if return_attention_mask else tokens

    def to_string(self, tokens: Union[Int[Tensor, "... pos"], Sequence[int]], skip_special_tokens: bool = False):
        """Decode [pos] to a string, or [batch pos] to a list of strings."""
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            return tokenizer.decode(tokens.tolist(), skip_special_tokens=skip_special_tokens)
        return tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=skip_special_tokens)

    def to_str_tokens(
        self, input: Union[str, Sequence[str], Int[Tensor, "... pos"], Sequence[int]]
    ) -> Union[list[str], list[list[str]]]:
        """Each token as a string, as in TransformerLens.

        A string, a [pos] tensor (or list of ids) or a [1 pos] tensor gives one list; a list of
        strings or a [batch pos] tensor with batch > 1 gives one list per row (TransformerLens
        refuses the latter).

        Example:
            >>> model.to_str_tokens(model.to_tokens(["Hi", "Tell me a joke"]))  # one list per row
        """
        tokenizer = self._require_tokenizer()
        if isinstance(input, str):
            ids = self.to_tokens(input)[0]
        elif isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(text) for text in input]
        else:
            ids = torch.as_tensor(input)
            if ids.ndim == 2 and ids.shape[0] != 1:
                return [self.to_str_tokens(row) for row in ids]
            ids = ids.reshape(-1) if ids.ndim == 2 else ids
            if ids.ndim != 1:
                raise ValueError(f"to_str_tokens takes [pos] or [batch pos] token ids, got shape {tuple(ids.shape)}.")
        return tokenizer.batch_decode([[i] for i in ids.tolist()])

    def get_token_position(
        self, single_token: Union[str, int, Tensor], input: Union[str, Int[Tensor, "... pos"]], mode: str = "first"
    ) -> int:
        """Position of `single_token` (a one-token string or an id) in `input` (a string, [pos] or
        [1 pos] ids), its first or last occurrence (`mode`), as in TransformerLens.

        Example:
            >>> model.get_token_position("joke", "Tell me a joke")
            3
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}.")
        tokens = self.to_tokens(input) if isinstance(input, str) else torch.as_tensor(input)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(
                    f"get_token_position searches one sequence; got {tokens.shape[0]} rows. Pass tokens[i]."
                )
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        positions = (tokens == token).nonzero().flatten().tolist()
        if not positions:
            raise ValueError(
                f"Token {token} ({self._require_tokenizer().decode([token])!r}) does not occur in the input "
                f"({len(tokens)} tokens)."
            )
        return positions[0] if mode == "first" else positions[-1]

    def to_single_token(self, text: str) -> int:
        ids = self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"{type(self).__name__}({c.model_name}: {c.n_layers} layers, d_model {c.d_model}, "
            f"{c.n_heads} heads ({c.n_key_value_heads} kv), vocab {c.d_vocab_out}, {c.dtype})"
        )
