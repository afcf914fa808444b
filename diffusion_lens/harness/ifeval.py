"""IFEval offline: the NLTK data lm-eval's IFEval needs, shipped, and a local-file IFEval task.

Why: lm-eval's IFEval scorer (`lm_eval.tasks.ifeval`) checks for NLTK's `punkt_tab` when it is
imported and downloads it when missing, and its task reads `google/IFEval` from the hub; neither
works offline. `use_shipped_nltk_data()` (run when `diffusion_lens.harness` is imported) appends a
minimal punkt_tab shipped in `diffusion_lens/harness/nltk_data` to the end of `nltk.data.path`
(a real one, if installed, still wins; see that folder's README for what it lacks). langdetect and
immutabledict need no data. The task `ifeval_local` (`tasks/ifeval_local.yaml`) is lm-eval's IFEval
(same prompt, generation settings, scorer and metrics, imported from lm_eval) over a JSONL file in
the google/IFEval format: by default `tasks/ifeval_tiny.jsonl`, eight prompts with the embedded
tiny-refusal model's own format instructions (capital letters, end with DONE); another file with
`--metadata '{"ifeval_jsonl": "PATH"}'`.

Example:
    >>> import lm_eval, diffusion_lens.harness as harness
    >>> lm_eval.simple_evaluate(model="diffusion-lens", model_args="pretrained=tiny-refusal,gen_length=32",
    ...                         tasks=["ifeval_local"], task_manager=harness.task_manager(), apply_chat_template=True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

#: The folder of the shipped task YAMLs (lm-eval's `--include_path`).
TASKS_DIR = Path(__file__).parent / "tasks"
#: The shipped NLTK data folder (a minimal English punkt_tab).
NLTK_DATA = Path(__file__).parent / "nltk_data"
#: The default data of `ifeval_local`.
IFEVAL_TINY = TASKS_DIR / "ifeval_tiny.jsonl"
_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


def use_shipped_nltk_data() -> None:
    """Make NLTK find a punkt_tab without a download: append the shipped folder to `nltk.data.path`.

    Example:
        >>> use_shipped_nltk_data()
        >>> import nltk; nltk.data.find("tokenizers/punkt_tab")
    """
    import nltk

    if str(NLTK_DATA) not in nltk.data.path:
        nltk.data.path.append(str(NLTK_DATA))


def load_ifeval_jsonl(ifeval_jsonl: Optional[str] = None, **_model_args):
    """The `custom_dataset` of `ifeval_local`: a JSONL in the google/IFEval format as split "train".

    lm-eval calls it with the task metadata, which holds the --model_args too (ignored here);
    `ifeval_jsonl` (from --metadata) names the file, default the shipped `ifeval_tiny.jsonl`. Each
    line needs key, prompt, instruction_id_list and kwargs (one dict per instruction).

    Example:
        >>> load_ifeval_jsonl()["train"][0]["instruction_id_list"]
        ['change_case:english_capital']
    """
    import datasets

    path = Path(ifeval_jsonl) if ifeval_jsonl is not None else IFEVAL_TINY
    if not path.is_file():
        raise FileNotFoundError(f"ifeval_jsonl={str(path)!r} is not a file; give a JSONL in the google/IFEval format.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [name for name in _FIELDS if name not in record]
        if missing:
            raise ValueError(f"{path}:{number} lacks {missing}; each line needs {list(_FIELDS)}.")
        if len(record["kwargs"]) != len(record["instruction_id_list"]):
            raise ValueError(f"{path}:{number}: kwargs needs one dict per instruction "
                             f"({len(record['instruction_id_list'])}); got {len(record['kwargs'])}.")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records.")
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(records)})


def task_manager(include_path=None, *, include_defaults: bool = True, metadata: Optional[dict] = None):
    """An lm-eval TaskManager that also knows the shipped tasks (`ifeval_local`), plus `include_path`.

    `include_defaults=False` skips indexing lm-eval's own ~10k task files (half a minute) when only
    the shipped or your own tasks are run; `metadata` reaches the tasks (e.g. {"ifeval_jsonl": PATH}).

    Example:
        >>> lm_eval.simple_evaluate(..., tasks=["ifeval_local"], task_manager=task_manager(include_defaults=False))
    """
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else ([include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=include_defaults,
                       metadata=metadata)
