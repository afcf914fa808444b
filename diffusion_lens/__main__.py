"""Command line: `python -m diffusion_lens demo` and `diffusion-lens abliterate MODEL --trials N --out DIR`
(the console script `diffusion-lens` is this module)."""

import argparse

from diffusion_lens.studies import abliteration
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.out, quick=args.quick)
    elif args.command == "abliterate":
        abliteration.run(args)


if __name__ == "__main__":
    main()
