"""Command line: ``python -m i2vedit bench attention|lora``."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m i2vedit",
        description="I2VEdit for Stable Video Diffusion: propagate an edited first frame through a video.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="print benchmark numbers as one JSON object")
    bench.add_argument(
        "what",
        choices=["attention", "lora"],
        help="attention: memory and time of attention matching; lora: motion LoRA training step time and memory",
    )
    bench.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from . import bench

        if args.reps < 1:
            print("error: --reps must be at least 1", file=sys.stderr)
            return 2
        result = bench.bench_attention(reps=args.reps) if args.what == "attention" else bench.bench_lora()
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
