"""lm-evaluation-harness integration: a (steered) diffusion LM as the lm-eval model "diffusion-lens".

Importing this package registers the model with lm-eval (lm-eval 0.4 finds third-party models
only in imported modules: it has no plugin entry points) and makes IFEval run offline (a shipped
minimal NLTK punkt_tab; `diffusion_lens.harness.ifeval`). From the shell use
`python -m diffusion_lens.harness ARGS`: lm-eval's own command line, unchanged, with this package
imported first and `--include_path` set to the shipped tasks (`ifeval_local`). Needs the `eval`
extra: `pip install "diffusion-lens[eval]"` (lm-eval[ifeval]).

Example:
    >>> import lm_eval, diffusion_lens.harness as harness
    >>> res = lm_eval.simple_evaluate(model="diffusion-lens",
    ...     model_args="pretrained=tiny-refusal,gen_length=32,steer=runs/dirs", tasks=["ifeval_local"],
    ...     task_manager=harness.task_manager(), apply_chat_template=True)
    >>> res["results"]["ifeval_local"]["prompt_level_strict_acc,none"]
"""

from diffusion_lens.harness.ifeval import TASKS_DIR, load_ifeval_jsonl, task_manager, use_shipped_nltk_data
from diffusion_lens.harness.likelihood import MCEstimate, mc_loglikelihood
from diffusion_lens.harness.lm_eval import DiffusionLensLM
from diffusion_lens.harness.steer import Steering, resolve_steering

use_shipped_nltk_data()

__all__ = ["DiffusionLensLM", "MCEstimate", "Steering", "TASKS_DIR", "load_ifeval_jsonl", "mc_loglikelihood",
           "resolve_steering", "task_manager", "use_shipped_nltk_data"]
