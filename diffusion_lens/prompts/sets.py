"""Prompt-set loaders for steering and evaluation, built on `datasets`.

Every loader returns a `datasets.Dataset` with the same columns -- `prompt` (str), `category`
(str, "" if the source has none), `source` (the loader name) and `id` (str) -- plus, for IFEval,
`instruction_id_list` and `kwargs`. Data come from the Hugging Face hub when online, or from a
local CSV / JSONL / JSON / Parquet file (`path=`) when offline; a local file may use either the
normalised column names or the hub's original ones.

=================  =========================================  ===========  =========================  ==========
loader             hub id (config)                            split        prompt column              licence
=================  =========================================  ===========  =========================  ==========
jailbreakbench     JailbreakBench/JBB-Behaviors (behaviors)   harmful      Goal (category: Category)  MIT
(benign=True)      JailbreakBench/JBB-Behaviors (behaviors)   benign       Goal                       MIT
advbench           walledai/AdvBench                          train        prompt (orig. CSV: goal)   MIT
harmbench          walledai/HarmBench (standard)              train        prompt (category)          MIT
alpaca             tatsu-lab/alpaca                           train        instruction, input == ""   CC BY-NC 4.0
ifeval             google/IFEval                              train        prompt (+ instruction_id_list, kwargs)  Apache-2.0
heretic_harmful    mlabonne/harmful_behaviors                 train, test  text                       MIT (AdvBench)
heretic_harmless   mlabonne/harmless_alpaca                   train, test  text                       CC BY-NC 4.0
=================  =========================================  ===========  =========================  ==========

The two `heretic_*` sets are p-e-w/heretic's defaults (directions from `split="train[:400]"`,
refusals and KL counted on `split="test[:100]"`); `split=` takes the `datasets` slicing syntax.
`refusal_splits` cuts any of these sets into the refusal-direction papers' 128 / 32 / 100
train / validation / test parts.

Offline (no network, or `HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`, or `offline=True`) without
`path=` raises an OSError that says which file to pass.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import datasets

COLUMNS = ("prompt", "category", "source", "id")


@dataclass(frozen=True)
class PromptSource:
    """Where a prompt set lives on the hub and how its columns map to the common schema.

    Example:
        >>> SOURCES["advbench"].hub_id, SOURCES["advbench"].licence
        ('walledai/AdvBench', 'MIT')
    """

    name: str
    hub_id: str
    config: Optional[str]
    split: str
    prompt_columns: tuple[str, ...]  # first present wins (normalised name first)
    category_columns: tuple[str, ...] = ("category",)
    licence: str = ""
    keep: Optional[Callable[[dict], bool]] = None
    extra_columns: tuple[str, ...] = ()


def _alpaca_keep(row: dict) -> bool:
    return not str(row.get("input") or "").strip()


SOURCES: dict[str, PromptSource] = {
    "jailbreakbench": PromptSource("jailbreakbench", "JailbreakBench/JBB-Behaviors", "behaviors", "harmful",
                                   ("prompt", "Goal", "goal"), ("category", "Category"), "MIT"),
    "jailbreakbench_benign": PromptSource("jailbreakbench_benign", "JailbreakBench/JBB-Behaviors", "behaviors",
                                          "benign", ("prompt", "Goal", "goal"), ("category", "Category"), "MIT"),
    "advbench": PromptSource("advbench", "walledai/AdvBench", None, "train", ("prompt", "goal", "Goal"), (), "MIT"),
    "harmbench": PromptSource("harmbench", "walledai/HarmBench", "standard", "train",
                              ("prompt", "Behavior", "behavior"), ("category", "SemanticCategory"), "MIT"),
    "alpaca": PromptSource("alpaca", "tatsu-lab/alpaca", None, "train", ("prompt", "instruction"), (),
                           "CC BY-NC 4.0", keep=_alpaca_keep),
    "ifeval": PromptSource("ifeval", "google/IFEval", None, "train", ("prompt",), (), "Apache-2.0",
                           extra_columns=("instruction_id_list", "kwargs")),
    "heretic_harmful": PromptSource("heretic_harmful", "mlabonne/harmful_behaviors", None, "train",
                                    ("prompt", "text"), (), "MIT (AdvBench)"),
    "heretic_harmless": PromptSource("heretic_harmless", "mlabonne/harmless_alpaca", None, "train",
                                     ("prompt", "text"), (), "CC BY-NC 4.0"),
}


def _is_offline(offline: Optional[bool]) -> bool:
    if offline is not None:
        return bool(offline)
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags) or bool(
        getattr(datasets.config, "HF_HUB_OFFLINE", False)
    )


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"No prompt file at {path}.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of records (or a dict with one list).")
        return data
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path)).to_list()
    raise ValueError(f"Unsupported prompt file type {suffix!r} ({path}); use .csv, .jsonl, .json or .parquet.")


def _from_hub(source: PromptSource, split: Optional[str]) -> list[dict]:
    try:
        ds = datasets.load_dataset(source.hub_id, source.config, split=split or source.split)
    except Exception as error:  # connection errors, gated repos, renamed ids...
        raise OSError(
            f"Could not load {source.hub_id!r} ({source.name}) from the Hugging Face hub "
            f"({type(error).__name__}: {error}). If you are offline, download it elsewhere and pass "
            f"path='/path/to/{source.name}.csv' (or .jsonl) with a '{source.prompt_columns[0]}' column."
        ) from error
    return ds.to_list()


def load_prompts(
    name: str,
    *,
    path: Union[str, Path, None] = None,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    offline: Optional[bool] = None,
) -> datasets.Dataset:
    """Load a named prompt set (see the module table) from the hub or from a local file.

    Example:
        >>> harmful = load_prompts("advbench", path="advbench.csv")          # offline
        >>> harmless = load_prompts("alpaca", limit=128)                       # online
        >>> harmful["prompt"][:2]
    """
    if name not in SOURCES:
        raise KeyError(f"Unknown prompt set {name!r}; known: {sorted(SOURCES)}.")
    source = SOURCES[name]
    if path is not None:
        rows = _read_local(Path(path))
    elif _is_offline(offline):
        raise OSError(
            f"Offline: cannot download {source.hub_id!r} ({source.name}, licence {source.licence}). Pass "
            f"path='/path/to/{source.name}.csv' (or .jsonl) holding a '{source.prompt_columns[0]}' column "
            f"(the hub's '{source.prompt_columns[-1]}' column also works)."
        )
    else:
        rows = _from_hub(source, split)
    return _normalise(rows, source, limit, origin=str(path) if path is not None else source.hub_id)


def _normalise(rows: list[dict], source: PromptSource, limit: Optional[int], origin: str) -> datasets.Dataset:
    if not rows:
        raise ValueError(f"{origin} holds no rows.")
    prompt_col = next((c for c in source.prompt_columns if c in rows[0]), None)
    if prompt_col is None:
        raise ValueError(
            f"{origin} has columns {sorted(rows[0])}; expected one of {list(source.prompt_columns)} for the prompt."
        )
    category_col = next((c for c in source.category_columns if c in rows[0]), None)
    out: dict[str, list[Any]] = {c: [] for c in COLUMNS + source.extra_columns}
    for i, row in enumerate(rows):
        if source.keep is not None and not source.keep(row):
            continue
        prompt = row.get(prompt_col)
        if not isinstance(prompt, str) or not prompt.strip():
            continue
        out["prompt"].append(prompt.strip())
        out["category"].append(str(row.get(category_col) or "") if category_col else "")
        out["source"].append(source.name)
        out["id"].append(str(row.get("id", row.get("key", row.get("Index", i)))))
        for column in source.extra_columns:
            value = row.get(column)
            if isinstance(value, str) and column in ("instruction_id_list", "kwargs"):
                value = json.loads(value)
            if column == "kwargs" and value is not None:
                value = [json.dumps({k: v for k, v in (kw or {}).items() if v is not None}) for kw in value]
            out[column].append(value)
        if limit is not None and len(out["prompt"]) >= limit:
            break
    if not out["prompt"]:
        raise ValueError(f"{origin} has no usable prompts after filtering.")
    return datasets.Dataset.from_dict(out)


def load_jailbreakbench(*, benign: bool = False, **kwargs) -> datasets.Dataset:
    """JailbreakBench behaviours (100 harmful, or 100 matched benign ones with `benign=True`).

    Example:
        >>> test = load_jailbreakbench(path="jbb.csv")
        >>> test["category"][:3]
    """
    return load_prompts("jailbreakbench_benign" if benign else "jailbreakbench", **kwargs)


def load_advbench(**kwargs) -> datasets.Dataset:
    """AdvBench harmful behaviours (520).

    Example:
        >>> train = load_advbench(path="harmful_behaviors.csv", limit=128)
        >>> len(train)
    """
    return load_prompts("advbench", **kwargs)


def load_harmbench(**kwargs) -> datasets.Dataset:
    """HarmBench standard behaviours.

    Example:
        >>> val = load_harmbench(path="harmbench.csv")
        >>> set(val["category"])
    """
    return load_prompts("harmbench", **kwargs)


def load_alpaca(**kwargs) -> datasets.Dataset:
    """Alpaca instructions with an empty input field (harmless prompts).

    Example:
        >>> harmless = load_alpaca(path="alpaca.jsonl")
        >>> train, val, test = split_prompts(harmless, (0.6, 0.2, 0.2), seed=42)
    """
    return load_prompts("alpaca", **kwargs)


def load_ifeval(**kwargs) -> datasets.Dataset:
    """IFEval prompts with `instruction_id_list` and `kwargs` (one JSON string per instruction).

    Example:
        >>> recs = load_ifeval(path="ifeval.jsonl")
        >>> instruction_following(responses, ifeval_records(recs))
    """
    return load_prompts("ifeval", **kwargs)


def load_heretic(*, harmless: bool = False, **kwargs) -> datasets.Dataset:
    """heretic's default prompt sets: mlabonne/harmful_behaviors (AdvBench goals, 416 train / 104 test),
    or mlabonne/harmless_alpaca with `harmless=True`; both hold one `text` column.

    Why: an abliteration compared with heretic's should see heretic's prompts (its directions use
    `split="train[:400]"`, its refusal count and KL `split="test[:100]"`).

    Example:
        >>> harmful = load_heretic(split="train[:400]")                        # online
        >>> harmless = load_heretic(harmless=True, path="harmless_alpaca.jsonl")  # offline
    """
    return load_prompts("heretic_harmless" if harmless else "heretic_harmful", **kwargs)


def ifeval_records(dataset: datasets.Dataset) -> list[dict]:
    """IFEval rows as records with `kwargs` decoded to dicts, for `evals.instruction_following`.

    Example:
        >>> recs = ifeval_records(load_ifeval(path="ifeval.jsonl"))
        >>> recs[0]["instruction_id_list"], recs[0]["kwargs"]
    """
    if "instruction_id_list" not in dataset.column_names:
        raise ValueError("This dataset has no instruction_id_list column; load it with load_ifeval.")
    return [
        {"prompt": row["prompt"], "instruction_id_list": row["instruction_id_list"],
         "kwargs": [json.loads(k) for k in row["kwargs"]]}
        for row in dataset
    ]


def split_prompts(
    dataset: datasets.Dataset, fractions: Sequence[float] = (0.6, 0.2, 0.2), *, seed: int = 42
) -> list[datasets.Dataset]:
    """Shuffle with `seed` and cut into consecutive parts of the given fractions (Arditi et al.: 60/20/20, seed 42).

    Every part with a non-zero fraction must get at least one prompt: too few prompts is an error
    that says how many are needed, never an empty validation split discovered later.

    Example:
        >>> train, val, test = split_prompts(load_alpaca(path="alpaca.jsonl"))
        >>> len(train), len(val), len(test)
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"split_prompts takes a datasets.Dataset; got {type(dataset).__name__}. For a list of "
                        "strings use datasets.Dataset.from_dict({'prompt': prompts}).")
    fractions = list(fractions)
    if not fractions or any(not isinstance(f, (int, float)) or isinstance(f, bool) or f < 0 for f in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be non-negative numbers that sum to 1; got {fractions}.")
    n = len(dataset)
    bounds = _split_bounds(n, fractions)
    empty = [i for i, ((a, b), f) in enumerate(zip(bounds, fractions)) if f > 0 and b <= a]
    if empty:
        needed = next(m for m in range(n + 1, n + 10_000) if all(
            b > a for (a, b), f in zip(_split_bounds(m, fractions), fractions) if f > 0))
        raise ValueError(
            f"split_prompts got {n} prompts, too few for fractions {fractions}: part(s) {empty} would be empty. "
            f"Pass at least {needed} prompts, or fewer parts."
        )
    shuffled = dataset.shuffle(seed=seed)
    return [shuffled.select(range(a, b)) for a, b in bounds]


#: Train / validation / test sizes of the refusal-direction papers (Arditi et al. 2024 and followers).
REFUSAL_SPLIT_SIZES: tuple[int, int, int] = (128, 32, 100)


def refusal_splits(
    dataset: datasets.Dataset, *, sizes: Sequence[int] = REFUSAL_SPLIT_SIZES, seed: int = 42
) -> list[datasets.Dataset]:
    """Shuffle with `seed` and take consecutive parts of exactly `sizes` prompts (default 128 / 32 / 100).

    Why: the refusal-direction papers fix the counts, not fractions: 128 prompts to find the
    direction, 32 to select it, 100 to report. Prompts beyond `sum(sizes)` are left out; fewer is an
    error that says how many are needed.

    Example:
        >>> train, val, test = refusal_splits(load_advbench(path="advbench.csv"))   # 520 -> 128 / 32 / 100
        >>> len(train), len(val), len(test)
        (128, 32, 100)
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"refusal_splits takes a datasets.Dataset; got {type(dataset).__name__}. For a list of "
                        "strings use datasets.Dataset.from_dict({'prompt': prompts}).")
    sizes = list(sizes)
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
        raise ValueError(f"sizes must be positive ints (e.g. (128, 32, 100)); got {sizes}.")
    if len(dataset) < sum(sizes):
        raise ValueError(
            f"refusal_splits needs {sum(sizes)} prompts for sizes {tuple(sizes)}; this dataset has {len(dataset)}. "
            f"Pass a larger set (AdvBench has 520, heretic's harmful train split 416) or smaller sizes=."
        )
    shuffled = dataset.shuffle(seed=seed)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [shuffled.select(range(a, a + k)) for a, k in zip(starts, sizes)]


def _split_bounds(n: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for i, f in enumerate(fractions):
        end = n if i == len(fractions) - 1 else start + int(round(f * n))
        bounds.append((start, min(end, n)))
        start = min(end, n)
    return bounds


#: Column names that hold the prompt in common prompt sets (compared case-insensitively).
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "instruction", "goal", "behavior", "question", "query", "text")


def prompt_column(dataset, column: Optional[str] = None) -> str:
    """The name of the prompt column of a `datasets.Dataset`: `column` if given, else the one column
    whose name is in `PROMPT_COLUMNS` (case-insensitive). None or several -> an error listing the columns.

    Example:
        >>> prompt_column(datasets.Dataset.from_dict({"Goal": ["..."], "Target": ["..."]}))
        'Goal'
    """
    names = _dataset_columns(dataset)
    if column is not None:
        if column not in names:
            raise KeyError(f"column={column!r} is not a column of this dataset; its columns are {names}.")
        return column
    found = [c for c in names if c.lower() in PROMPT_COLUMNS]
    if len(found) == 1:
        return found[0]
    which = f"several possible prompt columns {found}" if found else "no column named like a prompt"
    raise ValueError(
        f"This dataset has {which}; its columns are {names}. Name the prompt column with column='...'."
    )


def prompt_texts(dataset, column: Optional[str] = None) -> list[str]:
    """The prompts of a `datasets.Dataset` as a list of strings (column detected or named, see `prompt_column`).

    Example:
        >>> prompt_texts(load_advbench(path="advbench.csv"))[:2]
        >>> prompt_texts(raw_jbb, column="Goal")
    """
    name = prompt_column(dataset, column)
    values = dataset[name]
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"Column {name!r} must hold non-empty strings; rows {bad[:10]} do not "
                         f"(e.g. {values[bad[0]]!r}).")
    return list(values)


def _dataset_columns(dataset) -> list[str]:
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"Got a DatasetDict with splits {list(dataset)}; pass one split, e.g. dataset['train'].")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Expected a datasets.Dataset; got {type(dataset).__name__}.")
    return list(dataset.column_names)


__all__ = [
    "COLUMNS", "PROMPT_COLUMNS", "REFUSAL_SPLIT_SIZES", "SOURCES", "PromptSource", "ifeval_records",
    "load_advbench", "load_alpaca", "load_harmbench", "load_heretic", "load_ifeval", "load_jailbreakbench",
    "load_prompts", "prompt_column", "prompt_texts", "refusal_splits", "split_prompts",
]
