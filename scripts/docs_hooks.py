"""MkDocs build hooks: pages generated from the code at build time (see mkdocs.yml `hooks:`).

* `reference/hook_names.md`: every hook point of each model family, with the shape it has in a
  real forward. Each test fixture in `tests/fixtures/` (and the embedded `tiny-refusal` model when
  it is present) is loaded and run once on a [3, 11] batch of token ids with `run_with_cache`; the
  page lists `model.hook_dict` names and the shapes they produced. Nothing is hand-written, so the
  page cannot drift from the code.
* `model_card.md`: the embedded model's card, `diffusion_lens/pretrained/tiny-refusal/README.md`,
  copied in as it is.
* `tutorials/*.ipynb`: the notebooks, copied into the site so that the tutorials page can link to
  them (they are committed without outputs; `make notebooks` executes them in place).

Run `python scripts/docs_hooks.py` to print the generated hook-name page without building the site.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EMBEDDED = ROOT / "diffusion_lens" / "pretrained" / "tiny-refusal"
MODEL_CARD = EMBEDDED / "README.md"
TUTORIALS = ROOT / "tutorials"

BATCH, POS = 3, 11  # chosen to differ from every dimension of the tiny fixtures

# Families in reading order: dense LLaDA first, then the variants built on it, MoE last.
_FIXTURE_ORDER = {"llada": 0, "mmada": 1, "dream": 2, "llada-moe": 3}

# One fixture per family is enough for the names; the others are listed when their hook set differs.
_FAMILY_NOTES = {
    "llada": "LLaDA-8B-Base / -Instruct, LLaDA-1.5 (dense, MHA or GQA)",
    "mmada": "MMaDA-8B (LLaDA blocks; causal attention when a batch is padded)",
    "dream": "Dream-7B (Qwen2 blocks: q/k/v bias, GQA, logit shift 1)",
    "llada_moe": "LLaDA-MoE (per-head q/k RMSNorm, mixture-of-experts MLP)",
}


# ---------------------------------------------------------------------------------------------- hook names
def _dim_names(cfg) -> list[tuple[int, str]]:
    """Config sizes a hook dimension can be, in the order a tie is resolved."""
    names = [(BATCH, "batch"), (POS, "pos"), (cfg.d_model, "d_model"), (cfg.d_mlp, "d_mlp"),
             (cfg.d_head, "d_head"), (cfg.n_heads, "head")]
    if cfg.n_key_value_heads != cfg.n_heads:
        names.append((cfg.n_key_value_heads, "kv_head"))
    if cfg.n_experts:
        names += [(cfg.n_experts, "n_experts"), (cfg.d_expert_mlp, "d_expert_mlp")]
    if cfg.d_shared_expert_mlp:
        names.append((cfg.d_shared_expert_mlp, "d_shared_mlp"))
    names.append((1, "1"))
    return names


def symbolic_shape(name: str, shape: tuple[int, ...], cfg) -> str:
    """`[batch pos d_model]`-style shape: each size named after the config field it equals.

    Attention maps get `q_pos k_pos`; an expert's activations are `[routed ...]` (the tokens routed
    to that expert, a number that varies from forward to forward). A size no field explains, or that
    two fields explain, stays a number.
    """
    labels = []
    table = _dim_names(cfg)
    for i, size in enumerate(shape):
        if ".experts." in name and i == 0:
            labels.append("routed")
            continue
        if name.endswith(("hook_attn_scores", "hook_pattern")) and i >= 2 and size == POS:
            labels.append("q_pos" if i == 2 else "k_pos")
            continue
        matches = [label for value, label in table if value == size]
        if i == 0 and size == BATCH:
            labels.append("batch")
        elif len(set(matches)) == 1:
            labels.append(matches[0])
        elif matches and name.endswith(("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z",
                                        "hook_normalized")) and len(shape) == 4:
            labels.append({2: "head", 3: "d_head"}.get(i, str(size)) if i >= 2 else str(size))
        else:
            labels.append(str(size))
    return "[" + " ".join(labels) + "]"


def _generic(name: str) -> tuple[str, int | None]:
    """`blocks.3.mlp.experts.5.hook_out` -> (`blocks.{l}.mlp.experts.{e}.hook_out`, 3)."""
    match = re.match(r"blocks\.(\d+)\.", name)
    layer = int(match.group(1)) if match else None
    generic = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
    generic = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", generic)
    return generic, layer


def _layers_text(layers: list[int], n_layers: int) -> str:
    if not layers:
        return ""
    if layers == list(range(n_layers)):
        return "all"
    return ", ".join(map(str, layers))


def describe_model(path: Path) -> dict:
    """Load one checkpoint folder, run one forward caching everything, and describe its hooks."""
    import torch

    from diffusion_lens import HookedDiffusionTransformer

    model = HookedDiffusionTransformer.from_pretrained(path)
    cfg = model.cfg
    tokens = torch.randint(0, min(cfg.d_vocab, 50), (BATCH, POS), generator=torch.Generator().manual_seed(0))
    model.set_use_attn_result(True)  # so that the opt-in `attn.hook_result` fires too
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    rows: "OrderedDict[str, dict]" = OrderedDict()
    for name in model.hook_dict:
        generic, layer = _generic(name)
        shape = tuple(cache[name].shape) if name in cache else None
        row = rows.setdefault(generic, {"layers": [], "shape": shape, "example": name})
        if layer is not None and layer not in row["layers"]:
            row["layers"].append(layer)
        if row["shape"] is None:
            row["shape"] = shape
    for generic, row in rows.items():
        shape = row["shape"]
        row["symbolic"] = symbolic_shape(generic, shape, cfg) if shape is not None else "(did not fire)"
        row["concrete"] = "[" + " ".join(map(str, shape)) + "]" if shape is not None else ""
        row["layers_text"] = _layers_text(row["layers"], cfg.n_layers)
    family = model.adapter.name if model.adapter is not None else cfg.family
    return {"folder": path, "family": family, "cfg": cfg, "rows": rows, "n_hooks": len(model.hook_dict)}


_NOTES = {
    "attn.hook_result": "opt-in: `model.set_use_attn_result(True)`",
    "attn.hook_attn_scores": "switches attention to the explicit path (same numbers within 1e-5)",
    "attn.hook_pattern": "switches attention to the explicit path",
    "experts.{e}.": "only the tokens routed to expert e",
    "hook_scale": "RMSNorm divisor sqrt(mean(x^2) + eps)",
}


def _note(generic: str) -> str:
    for key, note in _NOTES.items():
        if key in generic:
            return note
    return ""


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
        "column says which blocks have the hook (MoE models may mix dense and MoE blocks).",
        "",
        "Shapes are written with the config field each size equals (`batch`, `pos`, `d_model`, `head`,",
        "`kv_head` for grouped-query attention, `d_head`, `d_mlp`, `n_experts`, `d_expert_mlp`); `routed` is",
        "the number of tokens routed to that expert in this forward. The concrete shape of the tiny",
        "checkpoint is given next to it.",
        "",
        "During `model.generate(...)` the same hook points fire once per denoising step, with",
        "`hook.state` set to that step's `DenoisingState` (see [Concepts](../concepts.md)).",
        "",
        "| checkpoint | adapter | layers | d_model | heads (kv) | d_head | d_mlp | experts | hook points |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        c = m["cfg"]
        experts = f"{c.n_experts} (top {c.n_experts_per_token})" if c.n_experts else "-"
        lines.append(
            f"| `{_relative(m['folder'])}` | `{m['family']}` | {c.n_layers} | {c.d_model} | {c.n_heads} "
            f"({c.n_key_value_heads}) | {c.d_head} | {c.d_mlp} | {experts} | {m['n_hooks']} |"
        )
    seen: dict[tuple, str] = {}
    for m in models:
        key = tuple((g, r["symbolic"], r["layers_text"]) for g, r in m["rows"].items())
        title = f"`{m['family']}`: `{_relative(m['folder'])}`"
        lines += ["", f"## {title}", ""]
        if m["family"] in _FAMILY_NOTES:
            lines += [f"Family: {_FAMILY_NOTES[m['family']]}.", ""]
        if key in seen:
            lines += [f"Same hook points and shapes as {seen[key]}.", ""]
            continue
        seen[key] = f"`{_relative(m['folder'])}`"
        lines += ["| hook point | layers | shape | tiny shape | note |", "|---|---|---|---|---|"]
        for generic, row in m["rows"].items():
            lines.append(
                f"| `{generic}` | {row['layers_text']} | `{row['symbolic']}` | `{row['concrete']}` | {_note(generic)} |"
            )
    lines.append("")
    return "\n".join(lines)


def model_card_page() -> str:
    if MODEL_CARD.is_file():
        return MODEL_CARD.read_text()
    return (
        "# tiny-refusal\n\n"
        "The embedded model's card (`diffusion_lens/pretrained/tiny-refusal/README.md`) is not in this\n"
        "checkout yet. It is copied here when the site is built.\n"
    )


# ---------------------------------------------------------------------------------------------- mkdocs hooks
def on_files(files, config):
    """Add the generated pages and the notebooks to the site's files."""
    from mkdocs.structure.files import File

    generated = {
        "reference/hook_names.md": hook_names_page(),
        "model_card.md": model_card_page(),
    }
    for src_uri, content in generated.items():
        files.append(File.generated(config, src_uri, content=content))
    for notebook in sorted(TUTORIALS.glob("*.ipynb")):
        files.append(File.generated(config, f"tutorials/{notebook.name}", abs_src_path=str(notebook)))
    return files


if __name__ == "__main__":
    print(hook_names_page())
