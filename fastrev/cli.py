"""Command line: ``fastrev demo`` (the main job) and friends."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .selfcheck import selfcheck
    return selfcheck()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="self-check of the reference and the kernel on this device")
    p.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
