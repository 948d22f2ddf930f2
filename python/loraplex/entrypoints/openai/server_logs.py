"""What the server logs, as vLLM's does: its start-up banner, the periodic stats line, and
uvicorn's access lines less those of quiet endpoints."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.config
import time

import loraplex
from loraplex.entrypoints.openai.serving_engine import ServingContext

logger = logging.getLogger("loraplex.serve")


def setup_logging(args: argparse.Namespace) -> None:
    if args.log_config_file:
        with open(args.log_config_file) as f:
            logging.config.dictConfig(json.load(f))
        return
    root = logging.getLogger("loraplex")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        root.addHandler(handler)
    root.setLevel(str(args.log_level).upper())


class QuietPaths(logging.Filter):
    """Drops uvicorn's access lines for ``--disable-access-log-for-endpoints``."""

    def __init__(self, paths: set[str]):
        super().__init__()
        self.paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = str(args[2]).split("?")[0] if len(args) > 2 else ""
        return path not in self.paths


def log_banner(ctx: ServingContext, address: str, adapters: list[str], routes: list[str]) -> None:
    logger.info(
        "loraplex %s serving %s as %s",
        loraplex.__version__,
        ctx.options.model,
        ctx.options.served_names,
    )
    logger.info("adapters: %s", ", ".join(adapters) or "none")
    logger.info("Available routes: %s", ", ".join(routes))
    logger.info("Serving on %s", address)


async def log_stats_forever(ctx: ServingContext, every: float) -> None:
    """vLLM's periodic line: throughput, requests running and waiting, KV use, adapters."""
    last = (time.monotonic(), ctx.metrics.total_prompt, ctx.metrics.total_generated)
    while True:
        await asyncio.sleep(every)
        now, prompt, generated = (
            time.monotonic(),
            ctx.metrics.total_prompt,
            ctx.metrics.total_generated,
        )
        span = max(1e-9, now - last[0])
        try:
            stats = await ctx.client.stats()
        except Exception:  # noqa: BLE001 - a stats line must never stop the server
            continue
        running = sum(s["running"] for s in stats.values())
        waiting = sum(s["waiting"] for s in stats.values())
        total = sum(s["kv_total_blocks"] for s in stats.values()) or 1
        used = 1 - sum(s["kv_free_blocks"] for s in stats.values()) / total
        resident = sum(1 for s in stats.values() for a in s["adapters"] if a["tiers"])
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Adapters resident: %d",
            (prompt - last[1]) / span,
            (generated - last[2]) / span,
            running,
            waiting,
            100 * used,
            resident,
        )
        last = (now, prompt, generated)
