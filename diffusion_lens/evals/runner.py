"""Batched, resumable evaluation: generate, judge, and append one JSONL row per prompt.

Why: a benchmark over hundreds of prompts on a real model takes hours; a crash (out of memory,
a lost node) must not cost the finished batches. `evaluate` writes each batch's rows and flushes
before the next batch; rerun the same call and it reads the file back, checks that it was made
with the same settings, skips the prompts already done and continues.

Row layout (one JSON object per line): `index` (position in the prompt list), `prompt`,
`response`, `verdicts` ({judge name: True = refusal}), `steering` (the caller's JSON-able
description of the hooks / edit), `seed`, `batch_size`, `generate_kwargs`, `judges` (each judge's
`config()`) and `model` (`cfg.model_name`).

Seeds and batches: prompts are cut into consecutive batches of `batch_size` in prompt order, and
the batch starting at prompt `i` is generated with `seed + i`. A response depends on its batch
(left padding, the batch's shared random draws), so a resumed run keeps the batch boundaries:
`batch_size` is part of the stored settings, and a batch left half-written by a crash is
generated again whole (its finished rows are kept, not duplicated).

Several processes: inside a `torch.distributed` process group (torchrun, accelerate launch) the
batches still to do are run in rounds of one batch per rank; each round's rows are gathered and
rank 0, the only process that reads or writes the file, appends them in prompt order. Every rank
returns the same `EvaluationRun`, row for row what one process writes (each batch has its own seed).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from diffusion_lens.denoising.generate import split_generate_kwargs
from diffusion_lens.evals.judges import Judge
from diffusion_lens.prompts import check_batch_size, prompt_texts
from diffusion_lens.prompts.distributed import broadcast_object, check_batch_draws, gather_records, my_batches, world

#: Row fields that must match the current call for a file to be resumed.
SETTINGS: tuple[str, ...] = ("steering", "seed", "batch_size", "generate_kwargs", "judges", "model")


def generate_texts(model, prompts: Sequence[str], *, batch_size: int, hooks=(), **generate_kwargs) -> list[str]:
    """Denoised response texts for `prompts`, `batch_size` prompts per `model.generate` call.

    Why: the one "generate in batches" loop every refusal count needs (studies, the abliteration
    objective, benchmarks). `generate_kwargs` go to `model.generate` unchanged (each batch gets
    the same `seed` if one is given); the per-batch progress bar is off unless `progress=True`.
    Inside a `torch.distributed` process group the batches are shared round-robin over the ranks
    and the texts gathered: every rank returns the one-process texts (random draws must then come
    from `seed=`, not a `generator=` or the global RNG, which depend on the batches run before).

    Example:
        >>> texts = generate_texts(model, harmful, batch_size=16, hooks=ablate(model, r), gen_length=32, steps=32)
        >>> refusal_rate(texts)
    """
    check_batch_size(batch_size)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty.")
    if world()[1] > 1:
        sampler, driver = split_generate_kwargs(model, generate_kwargs)
        check_batch_draws(sampler.stochastic(), driver, "generate_texts")
    mine = my_batches(range(0, len(prompts), batch_size))
    texts = [_batch_texts(model, prompts[start: start + batch_size], hooks, generate_kwargs) for _, start in mine]
    return [text for batch in gather_records(texts, [b for b, _ in mine]) for text in batch]


def _batch_texts(model, batch: list[str], hooks, generate_kwargs: dict) -> list[str]:
    """The texts of one `model.generate` call (progress bar off unless asked for)."""
    out = model.generate(batch, hooks=hooks, **{"progress": False, **generate_kwargs})
    if out.texts is None:
        raise ValueError("This model has no tokenizer, so generate returns no texts; load one with a tokenizer.")
    return out.texts


@dataclass
class EvaluationRun:
    """The rows of one evaluation file, in prompt order, with per-judge refusal rates.

    Example:
        >>> run = evaluate(model, prompts, judges=[SubstringJudge.jailbreakbench()], out="base.jsonl")
        >>> run.summary()["jbb_prefix"]["refusal_rate"]
        >>> print(run.table())
    """

    path: Path
    rows: list[dict]
    judges: list[str]

    @property
    def responses(self) -> list[str]:
        return [row["response"] for row in self.rows]

    def verdicts(self, judge: str) -> list[bool]:
        """One judge's verdicts in prompt order.

        Example:
            >>> run.verdicts("jbb_prefix")[:3]
            [True, True, False]
        """
        if judge not in self.judges:
            raise KeyError(f"No judge named {judge!r} in this run; its judges are {self.judges}.")
        return [row["verdicts"][judge] for row in self.rows]

    def summary(self) -> dict[str, dict]:
        """{judge name: {"refusal_rate", "refusals", "n"}} over the rows done.

        Example:
            >>> run.summary()
            {'jbb_prefix': {'refusal_rate': 0.75, 'refusals': 6, 'n': 8}}
        """
        out = {}
        for judge in self.judges:
            verdicts = self.verdicts(judge)
            refusals = sum(verdicts)
            out[judge] = {"refusal_rate": refusals / len(verdicts) if verdicts else float("nan"),
                          "refusals": refusals, "n": len(verdicts)}
        return out

    def table(self) -> str:
        """The summary as a printable text table (one line per judge).

        Example:
            >>> print(run.table())
            judge          refusal rate  refusals    n
            jbb_prefix            0.750         6    8
        """
        summary = self.summary()
        width = max([len("judge")] + [len(j) for j in summary])
        lines = [f"{'judge':<{width}}  refusal rate  refusals  {'n':>5}"]
        for judge, s in summary.items():
            lines.append(f"{judge:<{width}}  {s['refusal_rate']:>12.3f}  {s['refusals']:>8d}  {s['n']:>5d}")
        return "\n".join(lines)


def evaluate(
    model,
    prompts,
    *,
    judges: Sequence[Judge],
    out: Union[str, Path] = "run.jsonl",
    hooks=(),
    steering: Optional[dict] = None,
    seed: int = 0,
    batch_size: int = 16,
    generate_kwargs: Optional[dict] = None,
    progress: bool = True,
) -> EvaluationRun:
    """Generate a response for every prompt, judge it with every judge, append one JSONL row per prompt.

    Resumable: if `out` exists, its rows must come from the same prompts and settings (steering,
    seed, batch_size, generate_kwargs, judges, model), else an error says what differs; done
    prompts are skipped. A torn last line (a crash mid-write) is dropped with a warning.
    `hooks` steer the generation and must come with `steering`, a JSON-able description of them
    that every row records (hooks themselves cannot be stored). `prompts`: a list of strings or
    a `datasets.Dataset` (its prompt column). See the module docstring for seeds and batches, and
    for several processes (torchrun: rank 0 writes the file, every rank returns the same run).

    Example:
        >>> judges = [SubstringJudge.jailbreakbench(), SubstringJudge.whole_response()]
        >>> run = evaluate(model, load_jailbreakbench(path="jbb.csv"), judges=judges, out="ablated.jsonl",
        ...                hooks=ablate(model, r), steering={"kind": "ablate", "layer": 12},
        ...                generate_kwargs=dict(gen_length=64, steps=64))
        >>> print(run.table())
    """
    prompts = _prompt_list(prompts)
    judges = _check_judges(judges)
    check_batch_size(batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}.")
    if hooks and steering is None:
        raise ValueError("hooks were given without steering=: pass a JSON-able dict describing them (e.g. "
                         "{'kind': 'ablate', 'layer': 12}) so every row records how its response was steered.")
    settings = {
        "steering": _json_value(steering, "steering"),
        "seed": seed,
        "batch_size": batch_size,
        "generate_kwargs": _generate_kwargs(generate_kwargs),
        "judges": [judge.config() for judge in judges],
        "model": getattr(getattr(model, "cfg", None), "model_name", None),
    }
    _json_value(settings["judges"], "the judges' config()")
    path = Path(out)
    rank, size = world()
    # rank 0 reads (and may repair) the file; the others get its rows, or its error
    done = _on_rank_zero(lambda: _read_rows(path, prompts, settings))
    names = [judge.name for judge in judges]
    starts = list(range(0, len(prompts), batch_size))
    todo = [s for s in starts if any(i not in done for i in range(s, min(s + batch_size, len(prompts))))]

    from tqdm.auto import tqdm  # lazy: tqdm.auto probes for notebooks at import

    bar = tqdm(total=len(starts), initial=len(starts) - len(todo), desc="evaluating", unit="batch",
               disable=None if progress and rank == 0 else True)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a", encoding="utf-8") if rank == 0 else contextlib.nullcontext() as f:
            # rounds of `size` batches, one per rank (`my_batches`); the rows of a round are
            # gathered and rank 0 appends them (in prompt order) before the next round starts
            for first in range(0, len(todo), size):
                mine = my_batches(todo[first: first + size])
                rows = [_batch_rows(model, prompts, start, batch_size, hooks, judges, names, settings, done)
                        for _, start in mine]
                lines = []
                for batch_rows in gather_records(rows, [b for b, _ in mine]):
                    for row in batch_rows:
                        done[row["index"]] = row
                        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                if rank == 0:
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
                bar.update(min(first + size, len(todo)) - first)
    finally:
        bar.close()
    return EvaluationRun(path=path, rows=[done[i] for i in sorted(done)], judges=names)


def _batch_rows(model, prompts: list[str], start: int, batch_size: int, hooks, judges: list[Judge], names: list[str],
                settings: dict, done: dict[int, dict]) -> list[dict]:
    """The new rows of the batch starting at prompt `start`, generated with `seed + start` (see module docstring)."""
    batch = prompts[start: start + batch_size]
    texts = _batch_texts(model, batch, hooks, {"seed": settings["seed"] + start, **settings["generate_kwargs"]})
    verdicts = {judge.name: _verdicts(judge, batch, texts) for judge in judges}
    return [{"index": start + k, "prompt": prompt, "response": text,
             "verdicts": {name: verdicts[name][k] for name in names}, **settings}
            for k, (prompt, text) in enumerate(zip(batch, texts)) if start + k not in done]


def _on_rank_zero(fn):
    """`fn()` run by rank 0 only, its result (or the error it raised) on every rank: one process
    touches the file, and an error stops every rank instead of leaving the others waiting."""
    rank, size = world()
    if size == 1:
        return fn()
    result = None
    if rank == 0:
        try:
            result = ("ok", fn())
        except Exception as error:  # re-raised on every rank below
            result = ("error", error)
    kind, value = broadcast_object(result)
    if kind == "error":
        raise value
    return value


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings or a datasets.Dataset, not one string.")
    if hasattr(prompts, "column_names"):
        return prompt_texts(prompts)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompts must be non-empty strings; item {bad[0]} is {prompts[bad[0]]!r}.")
    return prompts


def _check_judges(judges) -> list[Judge]:
    if isinstance(judges, Judge):
        judges = [judges]
    judges = list(judges)
    if not judges:
        raise ValueError("judges is empty; pass e.g. [SubstringJudge.jailbreakbench()].")
    bad = [j for j in judges if not isinstance(j, Judge)]
    if bad:
        raise TypeError(f"judges must be Judge instances (evals.judges); got {type(bad[0]).__name__}.")
    names = [j.name for j in judges]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"Judge names must be distinct non-empty strings (they key the verdicts); got {names}.")
    return judges


def _verdicts(judge: Judge, prompts: list[str], texts: list[str]) -> list[bool]:
    verdicts = judge.judge(prompts, texts)
    if not isinstance(verdicts, list) or len(verdicts) != len(texts) or \
            not all(isinstance(v, bool) for v in verdicts):
        raise TypeError(f"Judge {judge.name!r} must return a list of {len(texts)} bools; got {verdicts!r}.")
    return verdicts


def _json_value(value, what: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be JSON-able (it is stored with every row): {error}.") from None


def _generate_kwargs(generate_kwargs: Optional[dict]) -> dict:
    kwargs = dict(generate_kwargs or {})
    own = sorted({"seed", "hooks", "generator", "progress"} & set(kwargs))
    if own:
        raise ValueError(f"generate_kwargs must not set {own}: evaluate sets the seed per batch (seed=), takes "
                         "hooks= and progress= itself, and a generator cannot be stored or resumed.")
    return _json_value(kwargs, "generate_kwargs")


def _read_rows(path: Path, prompts: list[str], settings: dict) -> dict[int, dict]:
    """The finished rows of an existing file, by prompt index, after checking they match this run."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows, good_bytes = [], 0
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path} line {number} is not JSON (and not the last line, so not a crash "
                             "mid-write); the file is damaged. Fix or remove that line, or use a new out path.") from None
        good_bytes += len(line) + 1
    if tail.strip():
        warnings.warn(f"{path}: dropping a torn last line ({len(tail)} bytes, no newline: the previous run stopped "
                      "while writing it); its prompts are generated again.", stacklevel=3)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    done: dict[int, dict] = {}
    line_of: dict[int, int] = {}
    for number, row in enumerate(rows, 1):
        index = row.get("index")
        if not isinstance(index, int) or not 0 <= index < len(prompts):
            raise ValueError(f"{path} line {number} has prompt index {index!r}, outside this run's {len(prompts)} "
                             "prompts; it belongs to another run. Use a new out path.")
        if row.get("prompt") != prompts[index]:
            raise ValueError(f"{path} line {number}: prompt {index} was {row.get('prompt')!r}, this run's is "
                             f"{prompts[index]!r}; the file belongs to another prompt list. Use a new out path.")
        differs = [f"{key}: stored {row.get(key)!r}, now {settings[key]!r}"
                   for key in SETTINGS if row.get(key) != settings[key]]
        if differs:
            raise ValueError(f"{path} was made with other settings ({'; '.join(differs)}). Resume with the same "
                             "settings, or use a new out path for this run.")
        if index in done:
            raise ValueError(f"{path} holds prompt {index} twice (lines {line_of[index]} and {number}); "
                             "the file was appended to by another run. Use a new out path.")
        done[index], line_of[index] = row, number
    return done


__all__ = ["SETTINGS", "EvaluationRun", "evaluate", "generate_texts"]
