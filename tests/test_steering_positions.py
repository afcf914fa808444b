"""Issue 11: one position vocabulary in steering (named selectors, deprecated ints), steering and
evals reach the step-0 canvas through `generate` only, and evals sits below steering."""

import ast
import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import diffusion_lens
from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.denoising import DenoisingState
from diffusion_lens.evals import first_position_kl, refusal_score
from diffusion_lens.steering import class_pca, collect_activations, mean_difference
from diffusion_lens.steering.positions import parse_positions, selector_name
from tests.conftest import FIXTURES

PACKAGE = Path(diffusion_lens.__file__).parent
SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict = {}


def load(name: str = "llada-tiny-mha") -> HookedDiffusionTransformer:
    if name not in _CACHE:
        _CACHE[name] = HookedDiffusionTransformer.from_pretrained(FIXTURES / name)
    return copy.deepcopy(_CACHE[name])


def token_prompts(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(length),), generator=g) for length in torch.randint(4, 8, (n,), generator=g)]


def test_named_selectors_give_the_directions_of_the_old_ints():
    model = load()
    pos, neg = token_prompts(5, 1), token_prompts(4, 2)
    common = dict(layers=[0, 2], gen_length=4, batch_size=3, progress=False)
    named = mean_difference(model, pos, neg, positions=["prompt[-3]", "last_prompt", "response[0]", "response[2]"], **common)
    with pytest.warns(DeprecationWarning):
        old = mean_difference(model, pos, neg, positions=[-3, -1, 0, 2], **common)
    torch.testing.assert_close(named.directions, old.directions, rtol=0, atol=0)
    assert named.positions == ["prompt[-3]", "last_prompt", "response[0]", "response[2]"]
    assert old.positions == [-3, -1, 0, 2]  # results of the old spelling keep their labels
    assert torch.equal(named.unit(2, "last_prompt"), old.unit(2, -1))
    single = mean_difference(model, pos, neg, positions="last_prompt", **common)
    torch.testing.assert_close(single.directions[:, 0], named.directions[:, 1], rtol=0, atol=0)

    acts = collect_activations(model, pos, sites=[SITE], pooling=["last_prompt", "response[1]"], gen_length=3)[SITE]
    with pytest.warns(DeprecationWarning):
        old_acts = collect_activations(model, pos, sites=[SITE], pooling=[-1, 1], gen_length=3)[SITE]
    assert torch.equal(acts, old_acts) and acts.shape == (5, 2, 64)
    assert class_pca(model, pos, neg, layer=1, gen_length=4).position == "last_prompt"  # default: today's -1


def test_the_deprecated_int_spelling_warns_with_what_to_write_at_the_callers_line():
    model = load()
    pos, neg = token_prompts(3, 3), token_prompts(3, 4)
    with pytest.warns(DeprecationWarning, match=r"Write positions=\['prompt\[-2\]', 'last_prompt', 'response\[0\]'\] "
                                                r"instead") as record:
        mean_difference(model, pos, neg, layers=[1], positions=[-2, -1, 0], gen_length=2, progress=False)
    assert Path(record[0].filename).name == Path(__file__).name  # the user's line, not the library's
    with pytest.warns(DeprecationWarning, match="Write position='last_prompt' instead"):
        class_pca(model, pos, neg, layer=1, position=-1, gen_length=2)
    with pytest.warns(DeprecationWarning, match=r"Write pooling='response\[1\]' instead"):
        collect_activations(model, pos, sites=[SITE], pooling=1, gen_length=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_positions(["prompt[-2]", "last_prompt", "response[0]"])  # the new spelling never warns
    assert [selector_name(o) for o in (-1, -4, 0, 3)] == ["last_prompt", "prompt[-4]", "response[0]", "response[3]"]


@pytest.mark.parametrize("spec", ["prompt[0]", "prompt[2]", "response[-1]", "last_response", ["last_prompt", "mean_all"]])
def test_unknown_selectors_name_the_vocabulary(spec):
    with pytest.raises(ValueError, match="expected 'last_prompt', 'prompt\\[-k\\]'"):
        parse_positions(spec)


def test_collect_activations_and_scores_go_through_generate():
    """A user hook sees the driver's state of step 0: the forwards run inside `generate`."""
    model = load()
    prompts = token_prompts(3, 5)
    seen = []

    def spy(act, hook):
        seen.append(hook.state)

    collect_activations(model, prompts, sites=[SITE], pooling="mean_all", gen_length=4, hooks=[("blocks.0.hook_resid_post", spy)])
    refusal_score(model, prompts, refusal_tokens=[7], gen_length=4, hooks=[("blocks.0.hook_resid_post", spy)])
    first_position_kl(model, prompts, [("blocks.0.hook_resid_post", spy)], gen_length=4)
    assert len(seen) == 3 and all(isinstance(s, DenoisingState) and s.step == 0 and s.n_steps == 1 for s in seen)
    assert all(s.response_start + 4 == s.n_pos for s in seen)


def _sources(*packages: str):
    for package in packages:
        for path in sorted((PACKAGE / package).glob("*.py")):
            yield path, ast.parse(path.read_text())


def test_no_module_in_steering_or_evals_builds_a_canvas_or_runs_the_model_itself():
    """Canvases are built in the denoising layer only (`build_canvas` via `CanvasProbe` / samplers);
    steering and evals call `generate`, never `model(...)`, a sampler's `run`, or a stop exception of
    their own outside the one `stop_after_sites` helper."""
    offenders = []
    for path, tree in _sources("steering", "evals"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "model":
                offenders.append(f"{path.name}:{node.lineno} calls model(...)")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("new_full", "run"):
                offenders.append(f"{path.name}:{node.lineno} calls .{node.func.attr}(...)")
            if isinstance(node, ast.ClassDef) and node.name.lower().endswith("stopforward") and path.name != "collect.py":
                offenders.append(f"{path.name}:{node.lineno} defines {node.name}")
    assert not offenders, offenders


def test_evals_import_no_steering_module():
    code = "import sys, diffusion_lens.evals; print(sorted(m for m in sys.modules if m.startswith('diffusion_lens.steering')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path, tree in _sources("evals"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("diffusion_lens.steering"), f"{path.name} imports {node.module}"


def test_old_imports_keep_working():
    from diffusion_lens import prompts as P
    from diffusion_lens.steering import instruction_template, prepare_prompts

    assert P.prepare_prompts is prepare_prompts and P.instruction_template is instruction_template
    assert callable(P.load_advbench) and callable(P.split_prompts)
    from diffusion_lens.steering import activations

    with pytest.warns(DeprecationWarning, match="moved to diffusion_lens.prompts.left_pad"):
        assert activations.left_pad is P.left_pad
    with pytest.raises(AttributeError, match="CanvasProbe"):
        activations.step0_canvases
