"""``loraplex serve``'s flags: every flag of ``vllm serve`` (the engine's, through
``EngineArgs``, and the server's, below), each honoured, accepted as meaning nothing here
(its reason in ``--help``), or refused naming it and why; then loraplex's own."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from loraplex.engine.arg_utils import AsyncEngineArgs
from loraplex.engine.vllm_args import INERT, REFUSED
from loraplex.entrypoints.openai.tool_parsers import PARSERS
from loraplex.lora.sources import SOURCE_KINDS

_TOOLS = "tools are served through the built-in parsers (--tool-call-parser)"
_ONE = "one API server process serves the engine"

# vLLM's server flags loraplex accepts and ignores: name -> (default, why)
FRONTEND_INERT: dict[str, tuple[Any, str]] = {
    "enable_server_load_tracking": (False, "server load is read from /metrics"),
    "enable_per_request_metrics": (False, "request timings are read from /metrics"),
    "enable_log_deltas": (True, "outputs are logged whole, once"),
    "cohere_is_reasoning_model": (True, "there is no /cohere route"),
    "cohere_format": ("cmd4", "there is no /cohere route"),
    "fingerprint_mode": ("full", "responses carry no system_fingerprint"),
    "fingerprint_value": (None, "responses carry no system_fingerprint"),
    "data_parallel_supervisor_port": (9256, _ONE),
    "dp_supervisor_probe_interval_s": (5.0, _ONE),
    "dp_supervisor_probe_timeout_s": (5.0, _ONE),
    "dp_supervisor_probe_failure_threshold": (3, _ONE),
    "enable_ssl_refresh": (False, "certificates are read once, at start"),
    "h11_max_header_count": (256, "uvicorn's h11 bounds headers itself"),
    "enable_offline_docs": (False, "FastAPI's docs need no assets from here"),
    "enable_flash_late_interaction": (True, "there is no pooling or scoring route"),
    "enable_tokenizer_info_endpoint": (False, "there is no /tokenizer_info route"),
    "disable_frontend_multiprocessing": (False, "the engine runs in the server's process"),
    "log_error_stack": (False, "errors at the door are logged with their stack"),
}
# refused unless left at vLLM's default: name -> (default, why)
FRONTEND_REFUSED: dict[str, tuple[Any, str]] = {
    "tool_server": (None, "tools run by the client: there is no tool server"),
    "tool_parser_plugin": ("", _TOOLS),
    "tokens_only": (False, "every route is served"),
    "middleware": ([], "loraplex does not import ASGI middleware named on the command line"),
    "headless": (False, _ONE),
    "api_server_count": (None, _ONE),
    "grpc": (False, "loraplex serves HTTP only"),
    "config": (None, "give the flags on the command line"),
}
_ALIASES = {
    "tensor_parallel_size": ["-tp"],
    "pipeline_parallel_size": ["-pp"],
    "data_parallel_size": ["-dp"],
    "decode_context_parallel_size": ["-dcp"],
    "data_parallel_rank": ["-dpn"],
    "data_parallel_start_rank": ["-dpr"],
    "data_parallel_size_local": ["-dpl"],
    "data_parallel_address": ["-dpa"],
    "data_parallel_rpc_port": ["-dpp"],
    "data_parallel_backend": ["-dpb"],
    "quantization": ["-q"],
    "compilation_config": ["-O"],
    "api_server_count": ["-asc"],
}


def _value(text: str) -> Any:
    """A flag's value: JSON where it is JSON (objects, lists, numbers, booleans), else the
    text; ``None`` and the empty string are None."""
    if text in ("", "None"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


# vLLM's flags whose default is None but which are switches, or take several values
_SWITCHES = {
    "async_scheduling",
    "disable_hybrid_kv_cache_manager",
    "eplb_log_balancedness",
    "guided_decoding_disable_fallback",
    "guided_decoding_disable_any_whitespace",
    "guided_decoding_disable_additional_properties",
    "enforce_eager",
}
_LISTS = {
    "cudagraph_capture_sizes",
    "cuda_graph_sizes",
    "allowed_media_domains",
    "collect_detailed_traces",
    "ignore_patterns",
    "logits_processors",
}


def _add_table(group, table: dict[str, tuple[Any, str]], prefix: str) -> None:
    for name, (default, why) in table.items():
        flags = [*_ALIASES.get(name, []), "--" + name.replace("_", "-")]
        text = f"{prefix}: {why}"
        if name == "hf_token":  # a token, or alone: use the stored one
            group.add_argument(*flags, nargs="?", const=True, default=default, help=text)
        elif name in _LISTS:
            group.add_argument(*flags, nargs="+", type=_value, default=default, help=text)
        elif isinstance(default, bool) or name in _SWITCHES:
            group.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif isinstance(default, list):
            group.add_argument(*flags, action="append", type=str, default=None, help=text)
        else:
            kind = type(default) if isinstance(default, (int, float)) else _value
            group.add_argument(*flags, type=kind, default=default, help=text, metavar="VALUE")


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The engine's flags (``EngineArgs.add_cli_args``), vLLM's server flags, then
    loraplex's; a server flag the engine also has (``--served-model-name``, several names as
    in vLLM) wins. The parser needs ``conflict_handler="resolve"``."""
    AsyncEngineArgs.add_cli_args(parser)
    engine = parser.add_argument_group("vLLM engine flags that mean nothing here, or refused")
    _add_table(engine, INERT, "accepted, inert")
    _add_table(engine, REFUSED, "refused unless at vLLM's default")
    p = parser.add_argument_group("server (vLLM's flags)")
    p.add_argument("model_tag", nargs="?", help="model folder (or hub id) to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds", default=None, help="a Unix socket to serve on instead")
    p.add_argument("--api-key", nargs="+", default=None, help="keys accepted (or LORAPLEX_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH")
    p.add_argument("--chat-template", default=None, help="a template file, or the template")
    p.add_argument(
        "--chat-template-content-format",
        choices=["auto", "string", "openai"],
        default="auto",
        help="content parts joined into a string (auto, string) or kept as text parts",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="render a request's own chat_template (refused otherwise)",
    )
    p.add_argument("--default-chat-template-kwargs", type=json.loads, default=None)
    p.add_argument("--response-role", default="assistant")
    p.add_argument(
        "--return-tokens-as-token-ids", action=argparse.BooleanOptionalAction, default=False
    )
    p.add_argument(
        "--enable-force-include-usage", action=argparse.BooleanOptionalAction, default=False
    )
    p.add_argument(
        "--enable-request-id-headers", action=argparse.BooleanOptionalAction, default=False
    )
    p.add_argument("--disable-fastapi-docs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--root-path", default=None)
    p.add_argument("--allowed-origins", type=json.loads, default=["*"])
    p.add_argument("--allowed-methods", type=json.loads, default=["*"])
    p.add_argument("--allowed-headers", type=json.loads, default=["*"])
    p.add_argument("--allow-credentials", action=argparse.BooleanOptionalAction, default=False)
    for name in ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-ciphers"):
        p.add_argument(name, default=None)
    p.add_argument("--ssl-cert-reqs", type=int, default=0)
    p.add_argument("--h11-max-incomplete-event-size", type=int, default=4 << 20)
    p.add_argument(
        "--uvicorn-log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        default="info",
    )
    p.add_argument(
        "--disable-uvicorn-access-log", action=argparse.BooleanOptionalAction, default=False
    )
    p.add_argument("--disable-access-log-for-endpoints", default=None, metavar="PATHS")
    p.add_argument("--log-config-file", default=os.environ.get("VLLM_LOGGING_CONFIG_PATH"))
    p.add_argument("--max-log-len", type=int, default=None)
    p.add_argument(
        "--enable-log-requests",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log a line per request",
    )
    p.add_argument(
        "--disable-log-requests",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(vLLM's older spelling) no line per request",
    )
    p.add_argument("--enable-log-outputs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--disable-log-stats",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no periodic stats line",
    )
    p.add_argument(
        "--generation-config",
        default="auto",
        help="request defaults from generation_config.json: 'auto' (the model's), 'vllm' "
        "(none), or a folder",
    )
    p.add_argument("--override-generation-config", type=json.loads, default=None)
    p.add_argument("--allow-runtime-lora-updating", action="store_true")
    p.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage.prompt_tokens_details.cached_tokens: prompt tokens found in the prefix cache",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="tool_choice='auto': calls found in the model's text by --tool-call-parser",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help=f"how calls are written in the model's text: {', '.join(sorted(PARSERS))}",
    )
    p.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help="leave tools out of the chat template when tool_choice is 'none'",
    )
    front = parser.add_argument_group("vLLM server flags that mean nothing here, or refused")
    _add_table(front, FRONTEND_INERT, "accepted, inert")
    _add_table(front, FRONTEND_REFUSED, "refused unless at vLLM's default")
    own = parser.add_argument_group("loraplex")
    own.add_argument(
        "--lora-root",
        action="append",
        default=[],
        metavar="DIR",
        help="folders adapters may be loaded from at run time (repeatable)",
    )
    own.add_argument(
        "--lora-sources",
        default="local",
        metavar="KINDS",
        help="where /v1/load_lora_adapter may load adapters from, comma-separated: "
        f"{', '.join(SOURCE_KINDS)} (local: inside --lora-root; hub: Hugging Face repo ids; "
        "s3, gs, az, http: object-store URLs, fetched into the adapter cache)",
    )
    own.add_argument(
        "--enable-lora-discovery",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a request naming an adapter nobody loaded is looked for in the --lora-root "
        "folders, as a folder of that name (vLLM's filesystem resolver)",
    )
    own.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=32 << 20,
        help="larger request bodies are refused (413) before they are read whole",
    )
    own.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds SIGTERM waits for in-flight requests",
    )
    own.add_argument("--log-level", default="info", help="loraplex's own log level")
    own.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        help="seconds between the periodic stats lines",
    )
    own.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="serve with N engine replicas on Ray Serve (pip install loraplex[ray]), "
        "adapter-affinity routed; a local Ray cluster unless --ray-address",
    )
    own.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="an existing Ray cluster for --replicas (e.g. auto, or ray://host:10001)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuses (``SystemExit`` naming the flag and why) what cannot be served."""
    for name, (default, why) in FRONTEND_REFUSED.items():
        value = getattr(args, name)
        if value not in (default, None, []):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"loraplex serve: {flag} is not supported by loraplex: {why}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("loraplex serve: --enable-auto-tool-choice requires --tool-call-parser")
    if args.tool_call_parser and args.tool_call_parser not in PARSERS:
        raise SystemExit(
            f"loraplex serve: invalid tool call parser: {args.tool_call_parser} (chose from "
            f"{{ {','.join(sorted(PARSERS))} }})"
        )
    if args.enable_log_outputs and not log_requests(args):
        raise SystemExit("loraplex serve: --enable-log-outputs requires --enable-log-requests")
    args.lora_sources = lora_sources(args.lora_sources)
    args.model = args.model_tag or args.model
    if not args.model:
        raise SystemExit("loraplex serve: name the model to serve (loraplex serve MODEL)")
    try:
        AsyncEngineArgs.from_cli_args(args).verify()
    except (ValueError, TypeError) as e:
        raise SystemExit(f"loraplex serve: {e}") from None


def lora_sources(value: str | frozenset[str]) -> frozenset[str]:
    """``--lora-sources``: the kinds named, each one of ``SOURCE_KINDS``."""
    if isinstance(value, frozenset):
        return value
    kinds = frozenset(k.strip().lower() for k in value.split(",") if k.strip())
    unknown = sorted(kinds - set(SOURCE_KINDS))
    if unknown or not kinds:
        raise SystemExit(
            f"loraplex serve: --lora-sources {value!r}: "
            + (f"unknown {', '.join(unknown)}; " if unknown else "")
            + f"choose from {', '.join(SOURCE_KINDS)}"
        )
    return kinds


def log_requests(args: argparse.Namespace) -> bool:
    return bool(args.enable_log_requests or args.disable_log_requests is False)


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's text, or the template itself."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except (OSError, ValueError):
        pass
    if "{" not in value:
        raise SystemExit(f"loraplex serve: --chat-template {value!r} is no file and no template")
    return value


_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(args: argparse.Namespace, model_folder: Path) -> dict[str, Any]:
    """vLLM's ``--generation-config``: request defaults from ``generation_config.json``
    (``auto``: the model's folder; ``vllm``: none; else that folder), then
    ``--override-generation-config``."""
    where = args.generation_config
    found: dict[str, Any] = {}
    if where != "vllm":
        folder = model_folder if where in ("auto", None) else Path(where)
        try:
            raw = json.loads((folder / "generation_config.json").read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as e:
            raise SystemExit(f"loraplex serve: --generation-config {where}: {e}") from None
        found = {ours: raw[key] for key, ours in _GENERATION_KEYS.items() if key in raw}
        if raw.get("do_sample") is False:  # transformers' greedy default
            found.pop("temperature", None)
            found.pop("top_p", None)
            found.pop("top_k", None)
    for key, value in (args.override_generation_config or {}).items():
        if key in _GENERATION_KEYS:
            found[_GENERATION_KEYS[key]] = value
    return found
