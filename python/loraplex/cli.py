"""The ``loraplex`` command: ``demo``, and ``serve`` (one engine in this process, or
``--replicas N`` engine replicas on Ray Serve behind the same routes)."""

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
    from loraplex.entrypoints.openai.cli_args import make_arg_parser

    make_arg_parser(serve)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from loraplex.entrypoints import demo

        return demo.main()
    if args.replicas is not None or args.ray_address is not None:
        try:
            from loraplex.entrypoints.ray.cluster import run_cluster
        except ImportError as e:
            raise SystemExit(
                f"loraplex serve --replicas needs Ray Serve: pip install loraplex[ray] ({e})"
            ) from None
        args.replicas = 1 if args.replicas is None else args.replicas
        return run_cluster(args)
    from loraplex.entrypoints.openai.api_server import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
