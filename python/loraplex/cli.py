"""The ``loraplex`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="serve one mixed batch through the base model and three adapters")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from loraplex.entrypoints import demo

        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
