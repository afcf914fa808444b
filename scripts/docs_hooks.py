"""MkDocs build hooks: pages generated from the code at build time (see mkdocs.yml `hooks:`).

* `reference/hook_names.md`: every hook point of each model family, with the shape it has in a
  real forward. Each test fixture in `tests/fixtures/` (and the embedded `tiny-refusal` model when
  it is present) is loaded and run on a [3, 11] batch of token ids with `run_with_cache`, once per
  pass for a model with several (`cfg.layer_scalar_passes`: DiffusionGemma's encoder and decoder,
  the self-conditioning pass given random logits); the page lists `model.hook_dict` names, the
  shapes they produced per layer (one row per distinct shape: sliding and full layers differ) and
  the passes a hook point fires in. Nothing is hand-written, so the page cannot drift from the code.
* `model_card.md`, `model_card_moe.md`: the embedded models' cards
  (`diffusion_lens/pretrained/<name>/README.md`), copied in with their links to each other
  pointed at the site's pages.
* `tutorials/*.ipynb`: the notebooks as pages. mkdocs-jupyter (mkdocs.yml) executes each one while
  the site is built, in `tutorials/` as `make notebooks` would, and renders it with its outputs and
  figures; the notebooks stay committed without outputs. `notebooks/*.ipynb`: the same files
  unexecuted, for download; each tutorial page links to its own.

Run `python scripts/docs_hooks.py` to print the generated hook-name page without building the site.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PRETRAINED = ROOT / "diffusion_lens" / "pretrained"
EMBEDDED = PRETRAINED / "tiny-refusal"
CARD_PAGES = {"tiny-refusal": "model_card.md", "tiny-refusal-moe": "model_card_moe.md"}  # model -> site page
TUTORIALS = ROOT / "tutorials"

BATCH, POS = 3, 11  # chosen to differ from every dimension of the tiny fixtures

# Families in reading order: dense LLaDA first, then the variants built on it, MoE last.
_FIXTURE_ORDER = {"llada": 0, "mmada": 1, "dream": 2, "llada-moe": 3, "llada2": 4, "diffusion-gemma": 5}

# One fixture per family is enough for the names; the others are listed when their hook set differs.
_FAMILY_NOTES = {
    "llada": "LLaDA-8B-Base / -Instruct, LLaDA-1.5 (dense, MHA or GQA)",
    "mmada": "MMaDA-8B (LLaDA blocks; causal attention when a batch is padded)",
    "dream": "Dream-7B (Qwen2 blocks: q/k/v bias, GQA, logit shift 1)",
    "llada_moe": "LLaDA-MoE (per-head q/k RMSNorm, mixture-of-experts MLP)",
    "llada2": "LLaDA2.0 / LLaDA2.1 (block diffusion: fused QKV split into q/k/v_proj, per-head q/k RMSNorm, "
              "partial RoPE; first layers dense, then a sigmoid-routed mixture of experts with group-limited "
              "top-k and an ungated shared expert; the router hooks are fp32)",
    "diffusion_gemma": "DiffusionGemma (Gemma-4 MoE, two passes over one KV cache: a causal encoder and a "
                       "denoising decoder; self-conditioning; sliding and full layers with different head "
                       "geometry; a dense MLP and the experts in parallel in every layer)",
}


# ---------------------------------------------------------------------------------------------- hook names
def _dim_names(cfg, name: str, layer: int | None) -> list[tuple[int, str]]:
    """Config sizes a dimension of hook `name` (in block `layer`) can be, the first match winning a tie.

    Attention hooks are named from the layer's own geometry (`d_head`, `kv_head` of that layer: they
    differ between sliding and full layers of DiffusionGemma), the others from the MLP's and experts'.
    """
    names = [(POS, "pos"), (cfg.d_model, "d_model")]  # `batch` is dimension 0 only
    if ".attn." in name and layer is not None:
        names += [(cfg.head_dim(layer), "d_head"), (cfg.n_heads, "head")]
        if cfg.kv_heads(layer) != cfg.n_heads:
            names.append((cfg.kv_heads(layer), "kv_head"))
    else:
        names.append((cfg.d_mlp, "d_mlp"))
        if cfg.n_experts:
            names += [(cfg.n_experts, "n_experts"), (cfg.d_expert_mlp, "d_expert_mlp")]
        if cfg.d_shared_expert_mlp:
            names.append((cfg.d_shared_expert_mlp, "d_shared_mlp"))
    return names


def symbolic_shape(name: str, shape: tuple[int, ...], cfg, layer: int | None = None) -> str:
    """`[batch pos d_model]`-style shape: each size named after the config field it equals.

    Attention maps get `q_pos k_pos`; an expert's activations are `[routed ...]` (the tokens routed
    to that expert, a number that varies from forward to forward); a norm's divisor ends in `1`. A
    size no field explains stays a number.
    """
    labels = []
    table = _dim_names(cfg, name, layer)
    for i, size in enumerate(shape):
        if ".experts." in name and i == 0:
            labels.append("routed")
        elif name.endswith(("hook_attn_scores", "hook_pattern")) and i >= 2 and size == POS:
            labels.append("q_pos" if i == 2 else "k_pos")
        elif name.endswith("hook_scale") and i == len(shape) - 1 and size == 1:
            labels.append("1")
        elif i == 0 and size == BATCH:
            labels.append("batch")
        else:
            labels.append(next((label for value, label in table if value == size), str(size)))
    return "[" + " ".join(labels) + "]"


def _generic(name: str) -> tuple[str, int | None]:
    """`blocks.3.mlp.experts.5.hook_out` -> (`blocks.{l}.mlp.experts.{e}.hook_out`, 3)."""
    match = re.match(r"blocks\.(\d+)\.", name)
    layer = int(match.group(1)) if match else None
    generic = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
    generic = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", generic)
    return generic, layer


def _layers_text(layers: list[int], cfg) -> str:
    """`all`, or the layers listed, with their attention kind when the model mixes kinds (`0, 2 (sliding_causal)`)."""
    if not layers:
        return ""
    if layers == list(range(cfg.n_layers)):
        return "all"
    text = ", ".join(map(str, layers))
    kinds = {cfg.layer_attention[layer] for layer in layers} if cfg.layer_attention else set()
    if len(kinds) == 1 and len(set(cfg.layer_attention)) > 1:
        text += f" ({kinds.pop()})"
    return text


def _head_geometry(cfg) -> str:
    """`d_head` and kv heads of the summary table: one value, or each distinct value with its layers' kind."""
    if cfg.layer_head_dims is None and cfg.layer_kv_heads is None:
        return f"{cfg.n_heads} ({cfg.n_key_value_heads}) | {cfg.d_head}"
    per_kind = OrderedDict()
    for layer in range(cfg.n_layers):
        kind = cfg.layer_attention[layer] if cfg.layer_attention else f"layer {layer}"
        per_kind.setdefault(kind, (cfg.kv_heads(layer), cfg.head_dim(layer)))
    heads = ", ".join(f"{cfg.n_heads} ({kv}) {kind}" for kind, (kv, _) in per_kind.items())
    dims = ", ".join(f"{d} {kind}" for kind, (_, d) in per_kind.items())
    return f"{heads} | {dims}"


def describe_model(path: Path) -> dict:
    """Load one checkpoint folder, run one forward per pass caching everything, and describe its hooks:
    `rows` maps each generic name to its rows, one per distinct (shape, passes it fires in)."""
    import torch

    from diffusion_lens import HookedDiffusionTransformer

    model = HookedDiffusionTransformer.from_pretrained(path)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, min(cfg.d_vocab, 50), (BATCH, POS), generator=generator)
    model.set_use_attn_result(True)  # so that the opt-in `attn.hook_result` fires too
    passes = cfg.layer_scalar_passes or (None,)
    caches = {}
    for pass_name in passes:  # one forward per pass; the self-conditioning pass reads random logits
        options = {} if pass_name is None else {"pass_name": pass_name}
        if pass_name is not None and pass_name == cfg.self_conditioning_pass:
            options["self_conditioning_logits"] = torch.randn(BATCH, POS, cfg.d_vocab_out, generator=generator)
        with torch.no_grad():
            caches[pass_name] = model.run_with_cache(tokens, **options)[1]
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    for name in model.hook_dict:
        generic, layer = _generic(name)
        fired = [pass_name for pass_name in passes if name in caches[pass_name]]
        shape = tuple(caches[fired[0]][name].shape) if fired else None
        symbolic = symbolic_shape(generic, shape, cfg, layer) if shape is not None else "(did not fire)"
        fixed = None if shape is None else shape[1:] if ".experts." in generic else shape  # routed varies
        only = tuple(fired) if len(fired) < len(passes) else ()  # () = every pass
        row = rows.setdefault((generic, symbolic, fixed, only), {"layers": [], "shape": shape, "passes": only})
        if layer is not None and layer not in row["layers"]:
            row["layers"].append(layer)
    by_name: "OrderedDict[str, list[dict]]" = OrderedDict()  # a hook point's rows together, in hook_dict order
    for (generic, symbolic, *_), row in rows.items():
        shape = row["shape"]
        row["generic"], row["symbolic"] = generic, symbolic
        row["concrete"] = "[" + " ".join(map(str, shape)) + "]" if shape is not None else ""
        row["layers_text"] = _layers_text(row["layers"], cfg)
        by_name.setdefault(generic, []).append(row)
    family = model.adapter.name if model.adapter is not None else cfg.family
    return {"folder": path, "family": family, "cfg": cfg, "rows": by_name, "n_hooks": len(model.hook_dict),
            "passes": [p for p in passes if p is not None]}


_NOTES = {
    "attn.hook_result": "opt-in: `model.set_use_attn_result(True)`",
    "attn.hook_attn_scores": "switches attention to the explicit path (same numbers within 1e-5)",
    "attn.hook_pattern": "switches attention to the explicit path",
    "experts.{e}.": "only the tokens routed to expert e",
    "hook_scale": "RMSNorm divisor sqrt(mean(x^2) + eps)",
}


def _note(row: dict) -> str:
    notes = [note for key, note in _NOTES.items() if key in row["generic"]][:1]
    if row["passes"]:
        notes.append(f"fires only in the {' and '.join(row['passes'])} pass")
    return "; ".join(notes)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def hook_names_page() -> str:
    """The markdown of `reference/hook_names.md`."""
    folders = sorted((p for p in FIXTURES.iterdir() if (p / "config.json").is_file()),
                     key=lambda p: (_FIXTURE_ORDER.get(p.name.split("-tiny")[0], 9), "gqa" in p.name, p.name))
    if (EMBEDDED / "config.json").is_file():
        folders.insert(0, EMBEDDED)
    models = [describe_model(folder) for folder in folders]
    lines = [
        "# Hook names by family",
        "",
        "<!-- Generated by scripts/docs_hooks.py at build time: do not edit. -->",
        "",
        "This page is **generated when the site is built**: each checkpoint below (the embedded model",
        "and every test fixture in `tests/fixtures/`) is loaded, run once with `run_with_cache` on a",
        f"batch of {BATCH} sequences of {POS} token ids, and its `model.hook_dict` is listed with the shape each",
        "hook point produced. Layer and expert indices are folded into `{l}` and `{e}`; the *layers*",
        "column says which blocks have the hook (MoE models may mix dense and MoE blocks). A hook point",
        "whose shape differs between layers gets one row per shape (DiffusionGemma's sliding and full",
        "layers have different `d_head` and `kv_head`; the layers column names the attention kind).",
        "",
        "A model with several passes over one set of weights (DiffusionGemma: `encoder` and `decoder`)",
        "is run once per pass (`pass_name=`); every hook point fires in every pass unless its note says",
        "otherwise, and `hook.pass_name` says which pass is running (select with `H.at(..., passes=)`).",
        "",
        "Shapes are written with the config field each size equals (`batch`, `pos`, `d_model`, `head`,",
        "`kv_head` for grouped-query attention, `d_head`, `d_mlp`, `n_experts`, `d_expert_mlp`); `routed` is",
        "the number of tokens routed to that expert in this forward. The concrete shape of the tiny",
        "checkpoint is given next to it.",
        "",
        "During `model.generate(...)` the same hook points fire once per denoising step, with",
        "`hook.state` set to that step's `DenoisingState` (see [Concepts](../concepts.md)).",
        "",
        "| checkpoint | adapter | layers | d_model | heads (kv) | d_head | d_mlp | experts | passes | hook points |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        c = m["cfg"]
        experts = f"{c.n_experts} (top {c.n_experts_per_token})" if c.n_experts else "-"
        passes = ", ".join(m["passes"]) or "-"
        lines.append(
            f"| `{_relative(m['folder'])}` | `{m['family']}` | {c.n_layers} | {c.d_model} | {_head_geometry(c)} "
            f"| {c.d_mlp} | {experts} | {passes} | {m['n_hooks']} |"
        )
    seen: dict[tuple, str] = {}
    for m in models:
        key = tuple((r["generic"], r["symbolic"], r["layers_text"], r["passes"])
                    for rows in m["rows"].values() for r in rows)
        title = f"`{m['family']}`: `{_relative(m['folder'])}`"
        lines += ["", f"## {title}", ""]
        if m["family"] in _FAMILY_NOTES:
            lines += [f"Family: {_FAMILY_NOTES[m['family']]}.", ""]
        if key in seen:
            lines += [f"Same hook points and shapes as {seen[key]}.", ""]
            continue
        seen[key] = f"`{_relative(m['folder'])}`"
        lines += ["| hook point | layers | shape | tiny shape | note |", "|---|---|---|---|---|"]
        for row in (r for rows in m["rows"].values() for r in rows):
            lines.append(
                f"| `{row['generic']}` | {row['layers_text']} | `{row['symbolic']}` | `{row['concrete']}` | {_note(row)} |"
            )
    lines.append("")
    return "\n".join(lines)


def model_card_page(name: str) -> str:
    """The card of the embedded model `name`; its `../<other>/README.md` links become site pages."""
    card = PRETRAINED / name / "README.md"
    if not card.is_file():
        return f"# {name}\n\nThis checkout has no card for the embedded model `{name}` (`{card.relative_to(ROOT)}`).\n"
    text = card.read_text()
    for other, page in CARD_PAGES.items():
        text = text.replace(f"](../{other}/README.md)", f"]({page})")
    return text


# ---------------------------------------------------------------------------------------------- mkdocs hooks
@event_priority(50)  # before mkdocs-jupyter's on_files, which turns `tutorials/*.ipynb` into pages
def on_files(files, config):
    """Add the generated pages, the notebooks as pages (`tutorials/`) and for download (`notebooks/`)."""
    from mkdocs.structure.files import File

    generated = {
        "reference/hook_names.md": hook_names_page(),
        **{page: model_card_page(name) for name, page in CARD_PAGES.items()},
    }
    for src_uri, content in generated.items():
        files.append(File.generated(config, src_uri, content=content))
    for notebook in sorted(TUTORIALS.glob("*.ipynb")):
        # a file of the repository (src_dir), not File.generated: mkdocs-jupyter's page wrapper reads
        # its source path through src_dir, which a generated file lacks
        files.append(File(f"tutorials/{notebook.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
        # given as content, so it has no source path and mkdocs-jupyter leaves it a plain file
        files.append(File.generated(config, f"notebooks/{notebook.name}", content=notebook.read_bytes()))
    return files


# mkdocs-jupyter always writes a MathJax loader; with no `custom_mathjax_url` its src is empty, which a
# browser reports as a failed script. The site serves no MathJax (a CDN copy would not load offline), so
# the loader is dropped, and a notebook with TeX in its markdown fails the build instead of showing raw TeX.
_MATHJAX_LOADER = '<script src=""> </script>'
_TEX = re.compile(r"\$[^$\n]+\$|\\\(|\\\[")


def _drop_mathjax(html: str, notebook: Path) -> str:
    if _MATHJAX_LOADER not in html:
        raise ValueError(f"{notebook.name}: mkdocs-jupyter's MathJax loader {_MATHJAX_LOADER!r} is not in the page; "
                         "its template changed, update scripts/docs_hooks.py and check tests/test_docs_site.py")
    markdown = "\n".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"]
                         if cell["cell_type"] == "markdown")
    if (tex := _TEX.search(markdown)) is not None:
        raise ValueError(f"{notebook.name}: TeX math {tex.group(0)!r} in a markdown cell, but the site serves no "
                         "MathJax; write it as text or code, or serve MathJax from the site (mkdocs.yml "
                         "`custom_mathjax_url`) and drop _drop_mathjax")
    return html.replace(_MATHJAX_LOADER, "")


def on_page_content(html, page, config, files):
    """Open each tutorial page with a link to its notebook, e.g. `notebooks/01_hooks....ipynb`, and drop
    the MathJax loader (see `_drop_mathjax`)."""
    src = page.file.src_uri
    if not (src.startswith("tutorials/") and src.endswith(".ipynb")):
        return html
    html = _drop_mathjax(html, Path(page.file.abs_src_path))
    download = files.get_file_from_path(f"notebooks/{src.removeprefix('tutorials/')}")
    link = download.url_relative_to(page.file)
    note = (f'<p class="notebook-download">Executed when this site was built. '
            f'<a href="{link}" download>Download the notebook</a> (without outputs) to run it yourself.</p>')
    return note + html


if __name__ == "__main__":
    print(hook_names_page())
