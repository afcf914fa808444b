"""Issue 16 item 4: several OS processes share one abliteration study in one SQLite file.

Two workers (this file run as a script) start together on a fresh `sqlite:///` file and each runs
`search(..., trials=2, study_name="shared")` on the embedded tiny-refusal. Each tags the trials it
asks for with its process id (it wraps `optuna.Study.ask`, which `study.optimize` calls once per
trial) and prints their numbers as JSON. So that the run is really concurrent whatever the start-up
times, the judge of each worker's first trial waits until the other worker's first trial has reached
its judge too (a file barrier): both trials are RUNNING in the storage at once, and the test checks
that from the trials' stored start/complete times. The workers get different seeds: with one seed
both would ask the same parameters (the TPE start-up trials are seeded random draws), i.e. run
each trial twice.

The file is fresh: both workers create Optuna's tables at once, which fails in about one start in
four without the retry `search` builds its storage with ("table studies already exists",
"UNIQUE constraint failed: alembic_version"; optuna#1092), so this covers that race too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

OPTS = dict(gen_length=8, steps=8, block_length=8)


def worker(db: str, barrier: str, name: str, seed: int) -> None:
    """One process of the shared study; prints {"pid", "trials"} on its last stdout line."""
    from diffusion_lens import HookedDiffusionTransformer
    from diffusion_lens.abliterate import search
    from diffusion_lens.evals import refusal_rate
    from diffusion_lens.studies.abliteration import prompt_sets

    ask = optuna.Study.ask
    asked: list[int] = []

    def tagged_ask(study, *args, **kwargs):
        trial = ask(study, *args, **kwargs)
        trial.set_user_attr("pid", os.getpid())
        asked.append(trial.number)
        return trial

    optuna.Study.ask = tagged_ask
    here, folder = Path(barrier) / name, Path(barrier)

    def judge(texts: list[str]) -> float:
        if not here.exists():  # the first trial: wait until the other worker is inside a trial too
            here.touch()
            deadline = time.time() + 120  # start-up skew on a loaded machine
            while len(list(folder.iterdir())) < 2:
                if time.time() > deadline:
                    raise TimeoutError(f"{name}: the other worker never reached its first trial's judge.")
                time.sleep(0.02)
        return refusal_rate(texts)

    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    sets = prompt_sets("tiny-refusal", None, None, n_train=8, n_eval=4)
    search(model, **sets, trials=2, storage=f"sqlite:///{db}", study_name="shared", seed=seed,
           generate_kwargs=OPTS, batch_size=8, judge=judge, progress=False)
    print(json.dumps({"pid": os.getpid(), "trials": asked}))


def test_two_processes_share_one_sqlite_study(tmp_path):
    db, barrier = tmp_path / "study.db", tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, __file__, str(db), str(barrier), name, str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, seed in (("a", 0), ("b", 1))]  # both started before either is waited on
    outs = [p.communicate(timeout=400) for p in procs]
    failed = [f"worker {name} (exit {p.returncode}):\n{err[-2500:]}" for name, p, (_, err) in zip("ab", procs, outs)
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    by_pid = {r["pid"]: r["trials"] for r in reports}
    assert len(by_pid) == 2 and all(len(numbers) == 2 for numbers in by_pid.values())
    assert sorted(n for numbers in by_pid.values() for n in numbers) == [0, 1, 2, 3]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # four different trials, not two twice
    for t in trials:  # the storage agrees with what each process says it ran
        assert t.number in by_pid[t.user_attrs["pid"]]
        refusal, kl = t.values
        assert 0.0 <= refusal <= 1.0 and kl >= 0.0 and t.user_attrs["first_position_kl"] >= 0.0
    (a, b) = [[t for t in trials if t.user_attrs["pid"] == pid] for pid in by_pid]
    overlapping = [(x.number, y.number) for x in a for y in b
                   if x.datetime_start < y.datetime_complete and y.datetime_start < x.datetime_complete]
    assert overlapping, [(t.number, t.user_attrs["pid"], t.datetime_start, t.datetime_complete) for t in trials]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
