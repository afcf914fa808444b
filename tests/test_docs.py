"""Issue 7: tutorials and documentation.

The notebooks themselves are executed while the site is built (`make docs`, which `make test` calls:
mkdocs-jupyter runs each one during `mkdocs build --strict`); these tests check what that build
cannot: that the notebooks are committed without outputs, read in order from the README, end with a
non-executed "On a real model" section, and that the generated hook-name reference covers every hook point.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
EXPECTED = [
    "01_hooks_and_denoising_steps.ipynb",
    "02_refusal_direction.ipynb",
    "03_optimal_transport_steering.ipynb",
    "04_patching_across_steps.ipynb",
    "05_adding_a_model.ipynb",
    "06_diffusion_gemma.ipynb",
    "07_automatic_abliteration.ipynb",
]


def _docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tutorial_exists_in_reading_order():
    assert [p.name for p in TUTORIALS] == EXPECTED


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; run `make notebooks-clean`"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebooks_end_with_a_real_model_section_that_is_not_executed(path):
    cells = json.loads(path.read_text())["cells"]
    headings = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                and re.search(r"^## On a real model", "".join(c["source"]), re.M)]
    assert headings, f"{path.name} has no '## On a real model' section"
    after = cells[headings[-1]:]
    assert all(c["cell_type"] == "markdown" for c in after), "the real-model section must not be executed in CI"
    assert "from_pretrained(" in "".join("".join(c["source"]) for c in after)


def test_readme_links_the_tutorials_in_reading_order():
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"tutorials/(\d\d_[a-z_]+\.ipynb)", readme)
    assert linked == EXPECTED


def test_tutorials_page_links_every_notebook():
    page = (ROOT / "docs" / "tutorials.md").read_text()
    assert re.findall(r"\(tutorials/(\d\d_[a-z_]+\.ipynb)\)", page) == EXPECTED


def test_generated_hook_reference_lists_every_hook_point_of_a_fixture():
    hooks = _docs_hooks()
    from diffusion_lens import HookedDiffusionTransformer

    folder = ROOT / "tests" / "fixtures" / "llada-moe-tiny-variant"
    described = hooks.describe_model(folder)
    model = HookedDiffusionTransformer.from_pretrained(folder)
    generic = {hooks._generic(name)[0] for name in model.hook_dict}
    assert set(described["rows"]) == generic
    assert all(row["shape"] is not None for rows in described["rows"].values() for row in rows), "a hook point did not fire"
    rows = {name: only for name, (only,) in described["rows"].items()}  # one shape per hook point here
    assert rows["blocks.{l}.attn.hook_pattern"]["symbolic"] == "[batch head q_pos k_pos]"
    assert rows["blocks.{l}.attn.hook_k"]["symbolic"] == "[batch pos kv_head d_head]"
    assert rows["blocks.{l}.mlp.experts.{e}.hook_out"]["symbolic"] == "[routed d_model]"
    assert rows["blocks.{l}.mlp.hook_pre"]["layers_text"] == "0"  # the variant's one dense block


def test_hook_reference_splits_diffusion_gemma_by_layer_kind_and_pass():
    """Sliding and full layers get a row each (their d_head / kv_head differ); self-conditioning
    hooks fire in the decoder pass only and say so; router shapes are named, not numbers."""
    hooks = _docs_hooks()
    described = hooks.describe_model(ROOT / "tests" / "fixtures" / "diffusion-gemma-tiny")
    assert described["passes"] == ["encoder", "decoder"]
    k = [(r["layers_text"], r["symbolic"], r["concrete"]) for r in described["rows"]["blocks.{l}.attn.hook_k"]]
    assert k == [("0, 2 (sliding_causal)", "[batch pos kv_head d_head]", "[3 11 2 16]"),
                 ("1, 3 (causal)", "[batch pos kv_head d_head]", "[3 11 1 32]")]
    (signal,) = described["rows"]["self_conditioning.hook_signal"]
    assert signal["passes"] == ("decoder",) and "fires only in the decoder pass" in hooks._note(signal)
    (resid,) = described["rows"]["blocks.{l}.hook_resid_post"]
    assert resid["passes"] == () and resid["layers_text"] == "all"
    (router,) = described["rows"]["blocks.{l}.mlp.hook_router_logits"]
    assert router["symbolic"] == "[batch pos n_experts]"


def test_hook_reference_page_covers_every_fixture():
    page = _docs_hooks().hook_names_page()
    for folder in (ROOT / "tests" / "fixtures").iterdir():
        if (folder / "config.json").is_file():
            assert f"`tests/fixtures/{folder.name}`" in page
