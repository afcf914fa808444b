"""Issue 11, item 4 (denoising side): names that cannot be confused.

`denoise_blocks=` (semi-autoregressive blocks; `blocks.3` in a hook name is layer 3) and
`guidance=` / `state.guidance` (classifier-free guidance; `cfg` is the model config). The old
spellings warn once per call site, naming the replacement, and give identical results; both
together are an error. "last_prompt" is a canvas position scope as in steering."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffusion_lens import hooks as H
from diffusion_lens.core.deprecation import no_keywords_left, renamed_attribute, renamed_keyword
from tests._denoising import golden_run, load_model

NAME = "llada-tiny-mha"
RESID = "blocks.0.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]


def run(golden_name, hook, cache_step):
    model, golden = load_model(NAME), golden_run(NAME, golden_name)
    kwargs = dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    spec = dict(names=[RESID], steps=[cache_step], include_unconditional=True)
    out = model.generate(golden["prompt"], hooks=[hook], cache=spec, **kwargs)
    return out.sequences, out.cache[cache_step][RESID]


def bump(act, hook):
    return act + 1.0


@pytest.mark.parametrize("old, new, golden_name, step", [
    (dict(blocks=1), dict(denoise_blocks=1), "gen_padded", 5),
    (dict(blocks=[-1]), dict(denoise_blocks=[-1]), "gen_padded", 6),
    (dict(cfg="conditional"), dict(guidance="conditional"), "gen_cfg", 2),
    (dict(cfg="unconditional"), dict(guidance="unconditional"), "gen_cfg", 2),
])
def test_old_keyword_warns_and_runs_like_the_new_one(old, new, golden_name, step):
    (keyword,), (replacement,) = old, new
    with pytest.warns(DeprecationWarning, match=rf"diffusion_lens renamed H\.at\({keyword}=\.\.\.\) to "
                                                rf"H\.at\({replacement}=\.\.\.\); the old name works until the next release"):
        old_hook = H.at(RESID, bump, steps=range(8), positions="response", **old)
    new_hook = H.at(RESID, bump, steps=range(8), positions="response", **new)
    assert old_hook[1].schedule == new_hook[1].schedule
    old_tokens, old_act = run(golden_name, old_hook, step)
    new_tokens, new_act = run(golden_name, new_hook, step)
    assert torch.equal(old_tokens, new_tokens) and torch.equal(old_act, new_act)
    untouched_tokens, untouched = run(golden_name, H.at(RESID, lambda a, hook: a, steps=0), step)
    assert not torch.equal(new_act, untouched)  # the schedule fires at `step`: the comparison means something


def test_the_warning_points_at_the_callers_line_once(tmp_path):
    """Python's "default" action shows it once per call site, at the user's line. In a fresh
    interpreter: the suite's shape checks wrap every package function in one more frame."""
    script = tmp_path / "user_script.py"
    script.write_text(
        "from diffusion_lens import hooks as H\n"
        "for _ in range(3):\n"
        "    H.at('hook_embed', lambda a, hook: a, blocks=0)\n"
        "H.at('hook_embed', lambda a, hook: a, cfg='both')\n"
    )
    done = subprocess.run([sys.executable, "-W", "default::DeprecationWarning", str(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = re.findall(r"user_script\.py:(\d+): DeprecationWarning: diffusion_lens renamed H\.at\((\w+)=", done.stderr)
    assert shown == [("3", "blocks"), ("4", "cfg")], done.stderr


@pytest.mark.parametrize("both, message", [
    (dict(blocks=0, denoise_blocks=1), r"H\.at\(\) got both blocks= and denoise_blocks=; .* pass only denoise_blocks="),
    (dict(cfg="conditional", guidance="unconditional"), r"H\.at\(\) got both cfg= and guidance=; .* pass only guidance="),
])
def test_old_and_new_together_is_an_error(both, message):
    with pytest.raises(TypeError, match=message):
        H.at(RESID, bump, **both)


def test_unknown_keyword_is_still_a_type_error():
    with pytest.raises(TypeError, match=r"H\.at\(\) got an unexpected keyword argument 'blokcs'"):
        H.at(RESID, bump, blokcs=1)
    with pytest.raises(ValueError, match=r"guidance='cond' must be 'both', 'conditional' or 'unconditional'"):
        H.at(RESID, bump, guidance="cond")


def test_old_attributes_warn_and_read_the_new_ones():
    model, golden = load_model(NAME), golden_run(NAME, "gen_cfg")
    kwargs = dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    states = []
    model.generate(golden["prompt"], hooks=[H.at(RESID, lambda a, hook: states.append(hook.state), steps=0)], **kwargs)
    with pytest.warns(DeprecationWarning, match=r"renamed DenoisingState\.cfg to DenoisingState\.guidance"):
        assert states[0].cfg is states[0].guidance is True
    schedule = H.at(RESID, bump, denoise_blocks=1, guidance="conditional")[1].schedule
    with pytest.warns(DeprecationWarning, match=r"renamed HookSchedule\.blocks to HookSchedule\.denoise_blocks"):
        assert schedule.blocks == 1
    with pytest.warns(DeprecationWarning, match=r"renamed HookSchedule\.cfg to HookSchedule\.guidance"):
        assert schedule.cfg == "conditional"


def test_the_suite_turns_a_stray_old_name_into_an_error():
    """pyproject's filterwarnings: outside `pytest.warns` an old name fails the test that uses it."""
    with pytest.raises(DeprecationWarning, match="diffusion_lens renamed"):
        H.at(RESID, bump, cfg="both")


def test_package_deprecations_are_errors_third_party_ones_are_not():
    with pytest.raises(DeprecationWarning, match="an old API"):
        warnings.warn_explicit("an old API", DeprecationWarning, "x.py", 1, module="diffusion_lens.steering.x")
    with pytest.raises(DeprecationWarning, match="an old API"):
        warnings.warn_explicit("an old API", DeprecationWarning, "x.py", 1, module="model_adapters.llada")
    with warnings.catch_warnings(record=True) as seen:  # the suite's filters, recorded here instead of shown
        warnings.warn_explicit("a third-party deprecation", DeprecationWarning, "x.py", 1, module="torch.x")
    assert [str(w.message) for w in seen] == ["a third-party deprecation"]


def test_the_helper_on_its_own():
    kwargs = {"old": 3}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert renamed_keyword(kwargs, "old", "new", None, where="f") == 3
        assert renamed_keyword({}, "old", "new", 5, where="f") == 5
    assert kwargs == {} and len(record) == 1 and record[0].category is DeprecationWarning
    with pytest.raises(TypeError, match=r"f\(\) got both old= and new="):
        renamed_keyword({"old": 3}, "old", "new", "x", where="f", default="both")
    no_keywords_left({}, "f")

    class Thing:
        new = 7
        old = renamed_attribute("old", "new", "Thing")

    with pytest.warns(DeprecationWarning, match=r"renamed Thing\.old to Thing\.new"):
        assert Thing().old == 7


# ------------------------------------------------------------------ "last_prompt": one canvas column per row
def test_last_prompt_scope_is_the_column_before_the_response():
    model, golden = load_model(NAME), golden_run(NAME, "gen_padded")
    kwargs = dict(attention_mask=golden["attention_mask"], progress=False, **golden["kwargs"])
    spec = dict(names=[RESID], steps=[1])
    base = model.generate(golden["prompt"], cache=spec, **kwargs).cache[1][RESID]
    hooked = model.generate(golden["prompt"], hooks=[H.at(RESID, bump, steps=1, positions="last_prompt")],
                            cache=spec, **kwargs).cache[1][RESID]
    changed = (hooked - base).abs().amax(-1) > 0
    expected = torch.zeros_like(changed)
    expected[:, 5] = True  # response_start 6
    assert torch.equal(changed, expected)
    stored = model.generate(golden["prompt"], cache=dict(spec, positions="last_prompt"), **kwargs).cache[1][RESID]
    assert torch.equal(stored, base[:, 5:6])


# ------------------------------------------------------------------ the docs speak the new names
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), ROOT / "tutorials/01_hooks_and_denoising_steps.ipynb"]
OLD = re.compile(r"H\.at\([^)]*\b(blocks|cfg)=|state\.cfg\b")


def code(path: Path) -> str:
    """The code a reader runs: fenced blocks of a page, code cells of a notebook (prose may name old spellings)."""
    if path.suffix != ".ipynb":
        return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S))
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_use_no_old_name(path):
    assert not OLD.findall(code(path)), f"{path.name} still uses H.at(blocks=/cfg=) or state.cfg"


def test_the_docs_check_can_fail():
    assert OLD.findall('```python\nH.at("blocks.0.hook_embed", fn, blocks=[0])\n```') == ["blocks"]
    assert not OLD.findall('H.at("blocks.0.hook_embed", fn, denoise_blocks=[0], guidance="both")')


def test_concepts_page_defines_the_vocabulary():
    concepts = (ROOT / "docs/concepts.md").read_text()
    for name in ("denoise_blocks=", "guidance=", "last_prompt", "layer"):
        assert name in concepts, name
