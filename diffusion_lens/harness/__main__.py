"""`python -m diffusion_lens.harness ARGS`: lm-eval's command line with the "diffusion-lens" model.

Why: lm-eval 0.4 discovers third-party models only in modules that are already imported (no
entry points), so the plain `lm_eval` command cannot see "diffusion-lens". This imports
`diffusion_lens.harness` (registration, offline NLTK data), adds `--include_path` with the
shipped tasks unless you give one, and runs lm-eval's own CLI with your arguments unchanged.

Example:
    $ HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python -m diffusion_lens.harness --model diffusion-lens \\
        --model_args pretrained=tiny-refusal,gen_length=32 --tasks ifeval_local --device cpu --apply_chat_template
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run lm-eval's CLI on `argv` (default: sys.argv[1:]) with diffusion-lens registered.

    Example:
        >>> main(["--model", "diffusion-lens", "--model_args", "pretrained=tiny-refusal", "--tasks", "ifeval_local"])
    """
    from lm_eval.__main__ import cli_evaluate

    from diffusion_lens.harness import TASKS_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
