"""The ``nwfast`` command line: ``nwfast demo`` (also ``python -m nwfast demo``)."""

import argparse
import sys

from nwfast.demo import MissingExtra, run_demo
from nwfast.ops import BACKENDS


def _int_at_least(minimum):
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        prog="nwfast", description="Fused Nadaraya-Watson (Gaussian attention) pooling."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train the textbook's Nadaraya-Watson model and plot it",
        description=(
            "Reproduce the textbook's Nadaraya-Watson experiment on the fused operator: "
            "an untrained kernel, a scalar w trained on the leave-one-out loss, the same "
            "without leave-one-out, a per-key w and a per-key w with a sqrt(w) penalty; "
            "then the Nadaraya-Watson and local-linear estimators with leave-one-out "
            "bandwidths and +-1.96 std bands. Writes fits.png, estimators.png, "
            "attention.png, loss.png, loss_vs_w.png, summary.txt and summary.json. "
            "Needs the demo extra: pip install 'nwfast[demo]'."
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    # Leave-one-out needs a second point to predict the first from.
    demo.add_argument(
        "--n-train", type=_int_at_least(2), default=50, help="training points (default 50)"
    )
    demo.add_argument(
        "--epochs", type=_int_at_least(1), default=100, help="SGD epochs per variant (default 100)"
    )
    demo.add_argument(
        "--lr", type=float, default=0.2, help="SGD learning rate on log w (default 0.2)"
    )
    demo.add_argument(
        "--penalty", type=float, default=3.0, help="weight of the mean sqrt(w) penalty (default 3)"
    )
    demo.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="nw_pool backend (default auto)",
    )
    demo.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        try:
            run_demo(
                seed=args.seed,
                n_train=args.n_train,
                epochs=args.epochs,
                lr=args.lr,
                penalty=args.penalty,
                out=args.out,
                backend=args.backend,
            )
        except MissingExtra as error:
            print(error, file=sys.stderr)
            return 1
    return 0
