"""Command line: `python -m diffusion_lens demo`."""

import argparse

from diffusion_lens.studies.refusal_demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusion_lens", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the refusal-direction study on the embedded models tiny-refusal and tiny-refusal-moe")
    demo.add_argument("--out", default="demo_out", help="folder for results (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a reduced study on fewer prompts (selection and refusal rates, both models)")
    args = parser.parse_args()
    if args.command == "demo":
        run_demo(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
