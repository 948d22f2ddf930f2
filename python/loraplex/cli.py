"""The ``loraplex`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="serve one mixed batch through the base model and three adapters")
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (vLLM's flags)",
        allow_abbrev=False,
        conflict_handler="resolve",
    )
    from loraplex.entrypoints.openai.api_server import make_arg_parser, run

    make_arg_parser(serve)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from loraplex.entrypoints import demo

        return demo.main()
    if args.command == "serve":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
