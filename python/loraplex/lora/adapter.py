"""PEFT LoRA adapters: read a folder (or hub repo), check every field and tensor against the
served model, and fold the scaling into B. Every failure names the adapter and the cause."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex._core import LoRARequest
from loraplex.errors import InvalidAdapterError
from loraplex.model.config import ModelConfig
from loraplex.model.llama import PROJECTIONS

MODULES = PROJECTIONS  # the targets loraplex serves, and where each one's weights go
_UNSUPPORTED = {"lm_head", "embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
_KEY = re.compile(
    r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)


def module_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a target projection."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }[module]


@dataclass
class LoRAAdapter:
    """A validated adapter: per (layer, module), A ``[r, in]`` and B ``[out, r]`` with the
    scaling folded into B, float32 on the host."""

    request: LoRARequest
    rank: int  # the largest rank over its modules
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def resolve_adapter_path(request: LoRARequest) -> Path:
    path = Path(request.lora_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or request.lora_path.startswith(("/", "./", "../", "~")):
        raise adapter_error(request, f"path {request.lora_path!r} is not a readable folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(request.lora_path))
    except Exception as e:  # the hub client raises many kinds; keep the cause
        raise adapter_error(
            request,
            f"path {request.lora_path!r} is not a local folder and could not be fetched as a "
            f"hub repo ({type(e).__name__}: {e})",
        ) from e


def check_request(request: LoRARequest) -> None:
    """What can be refused without reading anything (the core keeps only the adapter's
    name, id, path and base model)."""
    if request.tensorizer_config_dict is not None:
        raise adapter_error(
            request, "tensorizer_config_dict is not supported: load adapters from PEFT folders"
        )


def load_adapter(
    request: LoRARequest, cfg: ModelConfig, max_lora_rank: int, served_names: set[str]
) -> LoRAAdapter:
    """Reads and validates ``request``'s adapter; raises ``InvalidAdapterError``."""
    check_request(request)
    if request.base_model_name is not None and request.base_model_name not in served_names:
        raise adapter_error(
            request,
            f"base_model_name {request.base_model_name!r} does not match the served model "
            f"({' / '.join(sorted(served_names))})",
        )
    folder = resolve_adapter_path(request)
    config = _read_config(request, folder)
    _check_config(request, config, cfg)
    tensors = _read_tensors(request, folder)
    return _build(request, config, tensors, cfg, max_lora_rank)


def adapter_error(request: LoRARequest, cause: str) -> InvalidAdapterError:
    """The error for ``request``'s adapter, naming it (name, id, path) and the cause."""
    return InvalidAdapterError(
        f"adapter {request.lora_name!r} (id {request.lora_int_id}, "
        f"path {request.lora_path}): {cause}"
    )


def _read_config(request: LoRARequest, folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise adapter_error(request, f"no adapter_config.json in {folder}") from None
    except (OSError, ValueError, RecursionError) as e:  # JSON, UTF-8, nesting
        raise adapter_error(request, f"adapter_config.json is malformed ({e})") from e
    if not isinstance(config, dict):
        raise adapter_error(request, "adapter_config.json is malformed (not a JSON object)")
    return config


def _check_config(request: LoRARequest, c: dict[str, Any], cfg: ModelConfig) -> None:
    peft_type = c.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise adapter_error(
            request, f"peft_type {peft_type!r} is not supported: loraplex serves LORA adapters"
        )
    for field in ("r", "lora_alpha"):
        value = c.get(field)
        if not _is_positive(value):
            raise adapter_error(
                request, f"adapter_config.json: {field} must be a positive number, got {value!r}"
            )
    if c.get("bias", "none") != "none":
        raise adapter_error(request, f"bias {c.get('bias')!r} is not supported (only 'none')")
    if c.get("use_dora"):
        raise adapter_error(request, "DoRA (use_dora) is not supported")
    if c.get("modules_to_save"):
        raise adapter_error(request, f"modules_to_save {c['modules_to_save']} is not supported")
    if c.get("fan_in_fan_out"):
        raise adapter_error(
            request, "fan_in_fan_out is not supported for Llama-family linear layers"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = c.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise adapter_error(
                request, f"adapter_config.json: {field} must be a mapping, got {patterns!r}"
            )
        for pattern, value in patterns.items():
            _check_regex(request, f"{field} key", pattern)
            if not _is_positive(value):
                raise adapter_error(
                    request,
                    f"adapter_config.json: {field}[{pattern!r}] must be a positive number, "
                    f"got {value!r}",
                )
    targets = c.get("target_modules")
    if isinstance(targets, list):
        if not all(isinstance(name, str) for name in targets):
            raise adapter_error(
                request, f"adapter_config.json: target_modules must hold strings, got {targets!r}"
            )
        for name in targets:
            short = str(name).rsplit(".", 1)[-1]
            if short in MODULES:
                continue
            if short in _UNSUPPORTED:
                raise adapter_error(
                    request,
                    f"target module {name!r} is not supported: loraplex serves LoRA on "
                    f"{', '.join(MODULES)}",
                )
            raise adapter_error(
                request, f"target module {name!r}: {cfg.architecture} has no such module"
            )
    elif isinstance(targets, str):
        _check_regex(request, "target_modules", targets)
    else:
        raise adapter_error(
            request,
            f"adapter_config.json: target_modules must be a list or a regex, got {targets!r}",
        )


def _read_tensors(request: LoRARequest, folder: Path) -> dict[str, torch.Tensor]:
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load

            tensors = load(st.read_bytes())  # one read; faster than load_file's mmap
        elif binary.is_file():
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
        else:
            tensors = None
    except Exception as e:  # corrupt files raise many kinds; keep the cause
        raise adapter_error(
            request, f"cannot read adapter weights ({type(e).__name__}: {e})"
        ) from e
    if tensors is None:
        raise adapter_error(
            request, f"no adapter_model.safetensors or adapter_model.bin in {folder}"
        )
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise adapter_error(request, "the adapter weights are not a mapping of names to tensors")
    return tensors


def _check_regex(request: LoRARequest, what: str, pattern: Any) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise adapter_error(
            request, f"adapter_config.json: {what} {pattern!r} is not a regex ({e})"
        ) from e


def _is_positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _pattern_value(patterns: dict[str, Any], key: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches a module key's tail."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _build(request, c, tensors, cfg: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise adapter_error(
                request, f"weight {key!r} is not a LoRA A/B weight of a supported module"
            )
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULES:
            raise adapter_error(
                request, f"weight {key!r} targets {module!r}, which loraplex does not support"
            )
        if layer >= cfg.num_hidden_layers:
            raise adapter_error(
                request,
                f"weight {key!r} is for layer {layer}; the model has {cfg.num_hidden_layers}",
            )
        parts.setdefault((layer, module), {})[ab] = tensor
    if not parts:
        raise adapter_error(request, "the adapter has no LoRA weights")
    weights, max_rank = {}, 0
    scales: dict[str, tuple[Any, int, torch.Tensor]] = {}  # name -> alpha, r, B unscaled
    for (layer, module), ab in sorted(parts.items()):
        block = "self_attn" if MODULES[module][0] in ("qkv_proj", "o_proj") else "mlp"
        name = f"model.layers.{layer}.{block}.{module}"
        if set(ab) != {"A", "B"}:
            raise adapter_error(
                request, f"{name} has lora_{''.join(ab)} but not both lora_A and lora_B"
            )
        a, b = ab["A"], ab["B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise adapter_error(
                request,
                f"{name}: lora_A / lora_B must be floating point, got {a.dtype} / {b.dtype}",
            )
        a, b = a.float(), b.float()
        fan_in, fan_out = module_shape(cfg, module)
        r = a.shape[0] if a.dim() >= 1 else 0
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise adapter_error(
                request,
                f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"model's {module} ({fan_in} -> {fan_out}); "
                f"expected [r, {fan_in}] and [{fan_out}, r]",
            )
        expected_r = _pattern_value(c.get("rank_pattern"), name, c["r"])
        if r != expected_r:
            raise adapter_error(
                request, f"{name}: lora_A has rank {r} but the config says {expected_r}"
            )
        if r > max_lora_rank:
            raise adapter_error(
                request, f"rank {r} ({name}) is above max_lora_rank={max_lora_rank}"
            )
        alpha = _pattern_value(c.get("alpha_pattern"), name, c["lora_alpha"])
        if r < 1:
            raise adapter_error(request, f"{name}: lora_A has rank 0")
        scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        if not math.isfinite(scale):
            raise adapter_error(
                request,
                f"{name}: scaling lora_alpha / r = {alpha} / {r} makes lora_B non-finite",
            )
        weights[(layer, module)] = (a.contiguous(), (b * scale).contiguous())
        scales[name] = (alpha, r, b)
        max_rank = max(max_rank, r)
    # one finiteness check over every weight (a sum: NaN and inf carry through it; the
    # loader runs beside the step thread); only when it fails (a sum can also overflow) is
    # each module checked, and the culprit named
    flat = torch.cat([t.view(-1) for pair in weights.values() for t in pair])
    if not torch.isfinite(flat.sum()):
        for (a, scaled), (name, (alpha, r, b)) in zip(weights.values(), scales.items()):
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise adapter_error(request, f"{name} has non-finite values (NaN or inf)")
            if not torch.isfinite(scaled).all():
                raise adapter_error(
                    request,
                    f"{name}: scaling lora_alpha / r = {alpha} / {r} makes lora_B non-finite",
                )
    return LoRAAdapter(request, max_rank, weights)
