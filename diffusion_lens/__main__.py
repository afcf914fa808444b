"""Command line: `python -m diffusion_lens demo`, `diffusion-lens abliterate MODEL --trials N --out DIR`,
`diffusion-lens ot-protocol MODEL --out DIR` and `diffusion-lens lm-eval LM_EVAL_ARGS` (lm-eval's own
command line with the "diffusion-lens" model registered). The console script `diffusion-lens` is this module."""

import argparse
import sys

from diffusion_lens.studies import abliteration, ot_protocol
from diffusion_lens.studies.refusal_demo import run_demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="diffusion-lens", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the refusal-direction study on the embedded models tiny-refusal and tiny-refusal-moe")
    demo.add_argument("--out", default="demo_out", help="folder for results (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a reduced study on fewer prompts (selection and refusal rates, both models)")
    abliteration.add_arguments(commands.add_parser(
        "abliterate", help="automatic abliteration: a Pareto search of refusal vs diffusion KL (Optuna)",
        description=abliteration.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    ot_protocol.add_arguments(commands.add_parser(
        "ot-protocol", help="the optimal-transport paper's protocol: six steering methods scored on IFEval constraints",
        description=ot_protocol.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    commands.add_parser("lm-eval", add_help=False,
                        help="lm-eval-harness with the (steered) model 'diffusion-lens'; every later argument is "
                             "lm-eval's, e.g. --model diffusion-lens --model_args pretrained=tiny-refusal --tasks ifeval_local")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments (argparse cannot pass "--model ..." through)
        from diffusion_lens.harness.__main__ import main as lm_eval_main  # lm-eval is an extra: imported on use

        return lm_eval_main(argv[1:] or ["--help"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.out, quick=args.quick)
    elif args.command == "abliterate":
        abliteration.run(args)
    elif args.command == "ot-protocol":
        ot_protocol.run(args)


if __name__ == "__main__":
    main()
