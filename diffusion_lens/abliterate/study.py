"""Automatic abliteration: a heretic-style multi-objective search (Optuna, TPE) whose costs are
measured on the denoising process itself.

Each trial proposes an `AbliterationEdit` (which candidate direction, global or per-layer scope,
per-component ablation weights over depth; optionally a learned k-dim subspace as one more
candidate, `SearchSpace.subspace_rank`), applies it to the model's weights in place, measures
two objectives, and restores the weights bitwise:

* refusal: the judge's refusal rate (default `diffusion_lens.evals.refusal_rate`) over the whole
  denoised responses to the harmful evaluation prompts;
* diffusion KL: mean KL(unmodified || edited) over the still-masked response positions along the
  unmodified model's own denoising trajectories on the harmless evaluation prompts, recorded once
  and replayed teacher-forced for every trial (`diffusion_lens.evals.kl_reference`).

Every trial also stores the first-position KL (heretic's and Arditi's proxy: the first response
position of the step-0 canvas); `SearchResult.proxy_correlation()` says how well the proxy ranks
the trials like the diffusion KL. The study lives in an Optuna RDB storage (a SQLite file by
default), so a search resumes after a crash and several processes can share one study.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from diffusion_lens.evals import generate_texts, kl_reference, rank_correlation, refusal_rate
from diffusion_lens.prompts.distributed import broadcast_object, world
from diffusion_lens.steering import (AblationKernel, AbliterationEdit, Directions, LearnedSubspace, learn_subspace,
                                     mean_difference, model_components)

BLOCK_KINDS = ("attention", "mlp", "experts", "shared_expert")


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose. Candidate directions are difference-of-means directions of every
    layer at each position kind of `positions`, read at each denoising step of `extraction_steps`
    (one `mean_difference` each, computed once before the search). Per block component (attention,
    dense MLP, routed experts, shared expert: those the model has) a kernel over depth with its peak
    weight in `max_weight`, its peak anywhere, its minimum weight a fraction of the peak and its
    reach `min_weight_distance` (in layers); the embedding rows one weight in `embedding_weight`.

    `subspace_rank` k > 0 adds one more candidate, "learned_subspace[k]": a k-dim subspace learned
    before the search by `learn_subspace` (`subspace_steps` Adam steps through the frozen model, see
    `Candidates.compute`), the same basis at every layer. 0 (the default) learns nothing.

    Example:
        >>> SearchSpace(positions=("post_instruction",), norm_preserving=(False, True))
        >>> SearchSpace(subspace_rank=2, subspace_steps=20)        # + the candidate "learned_subspace[2]"
    """

    positions: tuple[str, ...] = ("post_instruction", "pre_instruction", "mean_response")
    extraction_steps: tuple[int, ...] = (0,)
    scopes: tuple[str, ...] = ("global", "per_layer")
    max_weight: tuple[float, float] = (0.5, 1.5)
    embedding_weight: tuple[float, float] = (0.0, 1.0)
    norm_preserving: tuple[bool, ...] = (False,)
    subspace_rank: int = 0
    subspace_steps: int = 20

    def __post_init__(self):
        for name in ("positions", "extraction_steps", "scopes", "norm_preserving"):
            if not getattr(self, name):
                raise ValueError(f"SearchSpace.{name} is empty; give at least one choice.")
        bad = [s for s in self.scopes if s not in ("global", "per_layer")]
        if bad:
            raise ValueError(f"SearchSpace.scopes has {bad}; the scopes are 'global' and 'per_layer'.")
        for name in ("max_weight", "embedding_weight"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"SearchSpace.{name} must be (low, high) with 0 <= low <= high; got {(low, high)}.")
        for name, least in (("subspace_rank", 0), ("subspace_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"SearchSpace.{name} must be an int >= {least}; got {value!r}.")


@dataclass
class Candidates:
    """Per-layer candidate directions [n_layers d_model] by name ("post_instruction[-1]@step0"): row l
    is the difference of class means of block l's output (`hook_resid_post`), as heretic reads them;
    a block input would be the bare token embedding at layer 0, the same for both classes at the
    chat template's positions. A position whose difference is zero at some layer has no direction
    there; it is listed in `left_out` (with those layers) instead of `directions`.

    With `SearchSpace.subspace_rank` k > 0, "learned_subspace[k]" holds the learned basis at every
    layer [n_layers k d_model]; `subspace` is its `LearnedSubspace` (losses per step) and
    `subspace_init` names the difference-of-means row it started from."""

    directions: dict[str, torch.Tensor]
    left_out: dict[str, list[int]] = field(default_factory=dict)
    subspace: Optional[LearnedSubspace] = None
    subspace_init: Optional[str] = None

    @classmethod
    def compute(cls, model, harmful: Sequence[str], harmless: Sequence[str], space: SearchSpace, *,
                gen_length: int, batch_size: int, generate_kwargs: Optional[dict] = None,
                seed: int = 0) -> "Candidates":
        """One `mean_difference` per (position kind, extraction step), every layer; then, with
        `space.subspace_rank` k > 0, one `learn_subspace` (rank k, `space.subspace_steps` steps, `seed`,
        the step-0 canvas with `gen_length` masks) on the same prompts.

        The subspace starts from the candidate row (candidate, layer) with the largest relative
        separation |m_harmful - m_harmless| / ((|m_harmful| + |m_harmless|) / 2) of the class means
        among the post-instruction candidates (all candidates when the space has none): the raw
        difference grows with the residual norm over depth, the ratio does not, so it picks where
        the classes are furthest apart for their size without a forward per row; post-instruction
        positions hold the same template tokens in both classes, so their difference is what the
        model computed about the request (where Arditi et al. read refusal), whereas elsewhere the
        ratio can be largest at layer 0 from token identity alone (bench: pre_instruction at layer
        0 won over all positions). The learning then improves a direction that already separates.

        Example:
            >>> Candidates.compute(model, harmful, harmless, SearchSpace(), gen_length=32, batch_size=32)
        """
        out: dict[str, torch.Tensor] = {}
        left_out: dict[str, list[int]] = {}
        best: dict[bool, tuple] = {}  # post-instruction or not -> (separation, "name layer l", row)
        for step in space.extraction_steps:
            for kind in space.positions:
                dirs: Directions = mean_difference(model, harmful, harmless, layers="all", positions=kind, step=step,
                                                   site="hook_resid_post", gen_length=gen_length,
                                                   batch_size=batch_size, progress=False,
                                                   generate_kwargs=generate_kwargs if step else None)
                for column, label in enumerate(dirs.positions):
                    vectors = dirs.directions[:, column]
                    zero = (vectors.norm(dim=-1) == 0).nonzero().flatten().tolist()
                    if zero:
                        left_out[f"{label}@step{step}"] = [dirs.layers[i] for i in zero]
                        continue
                    out[f"{label}@step{step}"] = vectors
                    size = (dirs.mean_positive[:, column].norm(dim=-1) + dirs.mean_negative[:, column].norm(dim=-1)) / 2
                    separation = vectors.norm(dim=-1) / size
                    row, post = int(separation.argmax()), str(label).startswith("post_instruction")
                    if float(separation[row]) > best.get(post, (-1.0,))[0]:
                        best[post] = (float(separation[row]), f"{label}@step{step} layer {dirs.layers[row]}", vectors[row])
        if not out:
            raise ValueError(f"Every candidate position has a zero difference of means at some layer ({left_out}): "
                             "the harmful and harmless prompts give the same activations there. Check the prompt sets.")
        if not space.subspace_rank:
            return cls(out, left_out)
        rank, (_, init_name, init) = space.subspace_rank, best.get(True, best.get(False))
        subspace = learn_subspace(model, harmful, harmless, rank=rank, init=init,
                                  steps=space.subspace_steps, gen_length=gen_length, batch_size=batch_size, seed=seed)
        out[f"learned_subspace[{rank}]"] = subspace.basis.expand(model.cfg.n_layers, -1, -1).clone()
        return cls(out, left_out, subspace, init_name)


def suggest_edit(trial, space: SearchSpace, candidates: Candidates, components: Sequence[str],
                 n_layers: int) -> AbliterationEdit:
    """The edit a trial's parameters describe (the same names replay a stored trial: `trial` may be an
    `optuna.trial.FrozenTrial`). Every parameter is suggested on every trial, so the search space is
    static (multivariate TPE models them jointly); `direction_index` is unused with per-layer scope,
    and both `scope` and `direction_index` are unused with the learned subspace ("learned_subspace[k]":
    its one basis at every layer; the search re-learns it identically when it resumes, so a stored
    trial rebuilds the same edit).

    Example:
        >>> edit = suggest_edit(study.best_trials[0], space, candidates, model_components(model), 6)
    """
    top = float(max(n_layers - 1, 1))
    name = trial.suggest_categorical("direction", sorted(candidates.directions))
    scope = trial.suggest_categorical("scope", list(space.scopes))
    index = trial.suggest_float("direction_index", 0.0, float(n_layers - 1))
    norm_preserving = trial.suggest_categorical("norm_preserving", list(space.norm_preserving))
    weights: dict = {}
    for kind in components:
        if kind in BLOCK_KINDS:
            peak = trial.suggest_float(f"{kind}.max_weight", *space.max_weight)
            weights[kind] = AblationKernel(
                max_weight=peak,
                max_weight_position=trial.suggest_float(f"{kind}.max_weight_position", 0.0, float(n_layers - 1)),
                min_weight=peak * trial.suggest_float(f"{kind}.min_weight_fraction", 0.0, 1.0),
                min_weight_distance=trial.suggest_float(f"{kind}.min_weight_distance", 0.5, top),
            )
        elif kind == "embedding":
            weights[kind] = trial.suggest_float("embedding.weight", *space.embedding_weight)
    directions = candidates.directions[name]
    return AbliterationEdit.from_directions(directions, weights,
                                            index=index if scope == "global" and directions.ndim == 2 else None,
                                            norm_preserving=norm_preserving)


@dataclass
class SearchResult:
    """A finished (or resumed) search: the Optuna study and what rebuilds any trial's edit.

    Example:
        >>> result.front()                     # the Pareto front, lowest refusal first
        >>> result.proxy_correlation()         # Spearman rho: first-position KL vs diffusion KL
        >>> edit = result.edit(result.choose(max_kl=0.1))
    """

    study: object
    space: SearchSpace
    candidates: Candidates
    components: list[str]
    n_layers: int
    info: dict = field(default_factory=dict)

    def trials(self) -> list:
        """Completed trials (both objectives measured).

        Example:
            >>> [t.values for t in result.trials()]      # [(refusal, diffusion KL), ...]
        """
        import optuna

        return [t for t in self.study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    def row(self, trial) -> dict:
        """One trial as a plain dict: number, both objectives, the proxy KL and the parameters.

        Example:
            >>> result.row(result.study.best_trials[0])["diffusion_kl"]
        """
        refusal, kl = trial.values
        row = {"trial": trial.number, "refusal": refusal, "diffusion_kl": kl,
               "first_position_kl": trial.user_attrs["first_position_kl"], "params": dict(trial.params)}
        if "prefill_kl" in trial.user_attrs:  # models whose run opens with a prompt prefill (DiffusionGemma)
            row["prefill_kl"] = trial.user_attrs["prefill_kl"]
        return row

    def front(self) -> list[dict]:
        """The Pareto front (`study.best_trials`) as rows, lowest refusal first.

        Example:
            >>> [(r["refusal"], r["diffusion_kl"]) for r in result.front()]
        """
        return sorted((self.row(t) for t in self.study.best_trials), key=lambda r: (r["refusal"], r["diffusion_kl"]))

    def choose(self, max_kl: float = 0.1):
        """The front trial with the lowest refusal among those with diffusion KL <= `max_kl` (ties:
        lower KL). An error names the front's lowest KL when no trial qualifies.

        Example:
            >>> result.choose(max_kl=0.1).number
        """
        front = [t for t in self.study.best_trials if t.values[1] <= max_kl]
        if not front:
            lowest = min((t.values[1] for t in self.study.best_trials), default=float("nan"))
            raise ValueError(f"No trial on the Pareto front has diffusion KL <= {max_kl} (lowest: {lowest:.4f}); "
                             "raise max_kl or run more trials.")
        return min(front, key=lambda t: (t.values[0], t.values[1]))

    def edit(self, trial) -> AbliterationEdit:
        """The edit trial `trial` (a FrozenTrial or its number) applied.

        Example:
            >>> with result.edit(12).applied(model):
            ...     model.generate("How do I pick a lock?")
        """
        if isinstance(trial, int):
            trial = self.study.trials[trial]
        return suggest_edit(trial, self.space, self.candidates, self.components, self.n_layers)

    def proxy_correlation(self, proxy: str = "first_position") -> float:
        """Spearman's rho between a proxy KL and the diffusion KL over completed trials: how far the
        proxy ranks edits like the measure it stands for. `proxy`: "first_position" (Arditi et al. /
        heretic's first-token KL) or "prefill" (the encoder's next-token KL heretic's DiffusionGemma
        pull requests use; only on models whose run opens with a prompt prefill).

        Example:
            >>> result.proxy_correlation()        # 1.0: the proxy orders the trials exactly as the diffusion KL
            >>> gemma_result.proxy_correlation("prefill")
        """
        if proxy not in ("first_position", "prefill"):
            raise ValueError(f"proxy must be 'first_position' or 'prefill'; got {proxy!r}.")
        rows = [self.row(t) for t in self.trials()]
        if any(f"{proxy}_kl" not in r for r in rows):
            raise ValueError(f"The trials have no {proxy} KL: this model's run has no prompt prefill (only "
                             "multi-pass models such as DiffusionGemma have one). Use proxy='first_position'.")
        return rank_correlation([r[f"{proxy}_kl"] for r in rows], [r["diffusion_kl"] for r in rows])


def _storage(url: Optional[str]):
    """The study's storage: None (in memory), or an `RDBStorage` for `url`, retried a few times.

    Why: processes starting together on a fresh SQLite file race on creating Optuna's tables
    (optuna#1092: "table studies already exists", "UNIQUE constraint failed: alembic_version");
    the loser sees a SQLAlchemy error, and on the next try finds the tables made."""
    if url is None:
        return None
    import optuna
    import sqlalchemy

    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url)
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == 9:
                raise
            time.sleep(0.1 * (attempt + 1))


def search(model, harmful_train: Sequence[str], harmless_train: Sequence[str], harmful_eval: Sequence[str],
           harmless_eval: Sequence[str], *, trials: int, storage: Optional[str] = None,
           study_name: str = "abliteration", seed: int = 0, space: SearchSpace = SearchSpace(),
           startup_trials: Optional[int] = None, generate_kwargs: Optional[dict] = None, batch_size: int = 32,
           kl_steps: Optional[Sequence[int]] = None, kl_max_bytes: Optional[int] = 2**30,
           judge: Callable[[list[str]], float] = refusal_rate, progress: bool = True) -> SearchResult:
    """Run (or resume) the search: `trials` more trials in the study `study_name` of `storage` (an
    SQLAlchemy URL such as "sqlite:///out/study.db"; None keeps it in memory). Objectives, both
    minimised: `judge` over the responses to `harmful_eval`, and the diffusion KL on `harmless_eval`
    (module docstring). TPE, multivariate, seeded, after `startup_trials` random trials (default:
    a quarter of `trials`, at least 4). `generate_kwargs`: the sampler options of every generation
    (gen_length, steps, block_length, ...). `kl_steps` / `kl_max_bytes`: the denoising steps the
    diffusion KL scores (default all) and the bound on the recorded reference (`kl_reference`): it
    keeps full-vocabulary log-probabilities, so on a 126k-token model score a few steps.

    Several processes. Independent workers (separate launches) may share one study through an RDB
    `storage`: each runs its `trials` and sees the others' (give every worker a different `seed`:
    with one seed their TPE start-up trials are the same random draws, so each trial is run twice).
    Inside a `torch.distributed` process group (torchrun, accelerate launch) the ranks instead
    evaluate each trial together: rank 0 asks Optuna and broadcasts the trial's parameters, every
    rank applies the same edit and runs its share of the batches (`mean_difference` for the
    candidates too), the results are gathered in batch order (the objectives are the one-process
    numbers bit for bit; the candidates' means up to float64 round-off) and rank 0 tells Optuna.
    Only rank 0 touches `storage`; every rank returns the same `SearchResult` (the others' `study`
    is an in-memory copy of rank 0's trials).

    Example:
        >>> result = search(model, harmful[:64], harmless[:64], harmful[64:], harmless[64:], trials=60,
        ...                 storage="sqlite:///abl/study.db", generate_kwargs=dict(gen_length=32, steps=32))
        >>> result.front()[0]
    """
    import optuna

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1; got {trials!r}.")
    for name, prompts in (("harmful_train", harmful_train), ("harmless_train", harmless_train),
                          ("harmful_eval", harmful_eval), ("harmless_eval", harmless_eval)):
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"{name} must be a non-empty list of prompts; got {prompts!r:.60}.")
    options = dict(generate_kwargs or {})
    gen_length = options.get("gen_length", model.adapter.sampler(model.cfg).gen_length)
    started = time.time()
    candidates = Candidates.compute(model, harmful_train, harmless_train, space, gen_length=gen_length,
                                    batch_size=batch_size, generate_kwargs=options, seed=seed)
    reference = kl_reference(model, list(harmless_eval), generate_kwargs=options, batch_size=batch_size,
                             steps=kl_steps, max_bytes=kl_max_bytes)
    components = [k for k in model_components(model) if k in BLOCK_KINDS or k == "embedding"]
    n_layers = model.cfg.n_layers
    rank, size = world()
    sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed,
                                         n_startup_trials=startup_trials if startup_trials is not None
                                         else max(4, trials // 4))
    if rank == 0:
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler,
                                    storage=_storage(storage), study_name=study_name, load_if_exists=True)
        study.set_user_attr("objectives", ["refusal", "diffusion_kl"])

    def measure(edit: AbliterationEdit) -> tuple[float, float, dict]:
        """Both objectives and the proxies of one edit; under several ranks each rank runs its share of
        the batches (generation batches and the reference's replay batches), gathered in batch order."""
        with edit.applied(model):
            texts = generate_texts(model, list(harmful_eval), batch_size=batch_size, **options)
            refusal = float(judge(texts))
            kl = reference.measure(model)  # each rank replays its share of the reference's batches
        attrs = {"first_position_kl": float(kl.first_position.mean())}
        if kl.prefill is not None:
            attrs["prefill_kl"] = float(kl.prefill.mean())
        if not math.isfinite(kl.masked.mean):
            raise ValueError("The diffusion KL is not finite: no masked position was measured (gen_length 0?).")
        return refusal, kl.masked.mean, attrs

    def objective(trial) -> tuple[float, float]:
        edit = suggest_edit(trial, space, candidates, components, n_layers)  # suggests every parameter
        broadcast_object(dict(trial.params) if size > 1 else None)  # the other ranks evaluate the same trial
        refusal, kl, attrs = measure(edit)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return refusal, kl

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if rank == 0:
        study.optimize(objective, n_trials=trials, show_progress_bar=progress, catch=())
    else:  # rank 0 asks Optuna; every other rank evaluates each trial's shard with the same parameters
        for _ in range(trials):
            measure(suggest_edit(optuna.trial.FixedTrial(broadcast_object(None)), space, candidates, components,
                                 n_layers))
    if size > 1:  # every rank returns the same result: rank 0's trials, in an in-memory copy of its study
        finished = broadcast_object(study.get_trials(deepcopy=False) if rank == 0 else None)
        if rank != 0:
            study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler, study_name=study_name)
            study.set_user_attr("objectives", ["refusal", "diffusion_kl"])
            study.add_trials(finished)
    info = {"seconds": round(time.time() - started, 1), "trials_this_run": trials, "seed": seed,
            "generate_kwargs": options, "kl_steps": reference.steps,
            "candidates": sorted(candidates.directions), "candidates_left_out": candidates.left_out, "n_prompts": {"harmful_train": len(harmful_train),
                                                     "harmless_train": len(harmless_train),
                                                     "harmful_eval": len(harmful_eval),
                                                     "harmless_eval": len(harmless_eval)}}
    if candidates.subspace is not None:
        info["learned_subspace"] = {**candidates.subspace.summary(), "init": candidates.subspace_init,
                                    "losses": candidates.subspace.losses}
    return SearchResult(study, space, candidates, components, n_layers, info)
