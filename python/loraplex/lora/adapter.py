"""PEFT LoRA adapters: read a folder (or hub repo), check every field and tensor against the
served model; slots copy the weights from the file, the scaling folded into B. Every failure
names the adapter and the cause."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from array import array
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import torch

from loraplex._core import AdapterFile, LoRARequest, ModulePatterns
from loraplex.errors import InvalidAdapterError
from loraplex.lora.sources import (
    Location,
    ObjectStoreCache,
    RefusedFile,
    locate,
    open_regular,
    read_with_timeout,
    source_of,
)
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


@dataclass(frozen=True)
class ModuleWeights:
    """Where one module's weights lie in the adapter's file, and what the checks measured."""

    a: int  # index of lora_A [r, in] among the file's tensors
    b: int  # index of lora_B [out, r]
    rank: int
    scale: float  # lora_alpha / r (or / sqrt(r)): folded into B as it is copied
    a_max: float  # the largest magnitude in A (float32)
    b_max: float  # the largest magnitude in B * scale (float32)


@dataclass(eq=False)
class LoRAAdapter:
    """A validated adapter: its weights file in memory (read once), the layout it shares with
    every adapter of the same header and config (where each module's A and B lie, ranks,
    scaling), and the largest magnitude the read measured in each of the file's tensors.
    Slots copy from the file directly (``LoRASlots.load``)."""

    request: LoRARequest
    layout: Layout
    maxes: list[float]  # per tensor of the file, in ``file.tensors()`` order
    file: AdapterFile
    version: str | None = None  # the content digest (object stores) or commit (hub)
    source: str = "local"  # "local", "hub" or an object store's scheme

    @property
    def rank(self) -> int:
        """The largest rank over its modules."""
        return self.layout.rank

    @cached_property
    def modules(self) -> dict[tuple[int, str], ModuleWeights]:
        """Per (layer, module), where its weights lie and what the checks measured (built on
        first use: loads read the shared layout)."""
        return {
            m.key: ModuleWeights(
                m.a, m.b, m.rank, m.scale, self.maxes[m.a], _scaled(self.maxes[m.b], m.scale)
            )
            for m in self.layout.modules
        }

    @property
    def weights(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Per (layer, module), A ``[r, in]`` and B ``[out, r]`` with the scaling folded in,
        as float32 tensors (built on each call; the engine never needs them)."""
        from safetensors.torch import load

        tensors = load(self.file.to_bytes())
        names = [name for name, *_ in self.file.tensors()]  # as the modules index them
        return {
            key: (tensors[names[m.a]].float(), tensors[names[m.b]].float() * m.scale)
            for key, m in self.modules.items()
        }

    @classmethod
    def from_weights(
        cls,
        request: LoRARequest,
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    ) -> LoRAAdapter:
        """An adapter of these A ``[r, in]`` and B ``[out, r]`` (scaling already in B), as
        if read from a file (tests build slots from it)."""
        from safetensors.torch import save

        named, names = {}, {}
        for (layer, module), (a, b) in weights.items():
            prefix = f"base_model.model.model.layers.{layer}.{_block(module)}.{module}"
            name_a, name_b = names[(layer, module)] = (
                f"{prefix}.lora_A.weight",
                f"{prefix}.lora_B.weight",
            )
            named[name_a], named[name_b] = a.float().contiguous(), b.float().contiguous()
        file = AdapterFile.from_bytes(save(named))
        index = {name: i for i, (name, *_) in enumerate(file.tensors())}
        modules = []
        for (layer, module), (name_a, name_b) in sorted(names.items()):
            r = weights[(layer, module)][0].shape[0]
            name = f"model.layers.{layer}.{_block(module)}.{module}"
            modules.append(_Module((layer, module), name, index[name_a], index[name_b], r, r, 1.0))
        return cls(request, Layout(tuple(modules)), file.max_abs(), file)


def _block(module: str) -> str:
    return "self_attn" if MODULES[module][0] in ("qkv_proj", "o_proj") else "mlp"


def check_path(request: LoRARequest) -> None:
    """Path accessibility at submission: a local path (one that exists, or is written as a
    path) must be a folder this process can read; a hub id is left to the loader."""
    if source_of(request.lora_path) != "local":
        return
    path = Path(request.lora_path).expanduser()
    why = ""
    if not path.is_dir():
        why = ": it does not exist" if not path.exists() else ": it is not a folder"
    elif not os.access(path, os.R_OK | os.X_OK):
        why = " (permissions)"
    if why:
        raise adapter_error(request, f"path {request.lora_path!r} is not a readable folder{why}")


def check_request(request: LoRARequest) -> None:
    """What can be refused without reading anything (the core keeps only the adapter's
    name, id, path and base model)."""
    if request.tensorizer_config_dict is not None:
        raise adapter_error(
            request, "tensorizer_config_dict is not supported: load adapters from PEFT folders"
        )


@dataclass
class ReadPolicy:
    """How an engine reads adapters: the roots local folders are confined beneath
    (resolved), the object-store cache, how long one adapter's whole read may take, and
    which way paths are resolved beneath roots (``walk``: the component walk, for tests)."""

    roots: list[str] = dataclasses.field(default_factory=list)
    cache: ObjectStoreCache = dataclasses.field(default_factory=lambda: ObjectStoreCache(None))
    timeout: float = 60.0
    walk: bool = False

    def __post_init__(self) -> None:
        self.roots = [os.path.realpath(os.path.expanduser(r)) for r in self.roots]


_DEFAULT_POLICY = ReadPolicy()


def load_adapter(
    request: LoRARequest,
    cfg: ModelConfig,
    max_lora_rank: int,
    served_names: set[str],
    policy: ReadPolicy = _DEFAULT_POLICY,
) -> LoRAAdapter:
    """Reads and validates ``request``'s adapter; raises ``InvalidAdapterError``. The whole
    read (fetch included) runs on a thread of its own for at most ``policy.timeout``."""
    check_request(request)
    if request.base_model_name is not None and request.base_model_name not in served_names:
        raise adapter_error(
            request,
            f"base_model_name {request.base_model_name!r} does not match the served model "
            f"({' / '.join(sorted(served_names))})",
        )
    check_path(request)
    try:
        where, config, file = read_with_timeout(
            lambda: _read(request, cfg, policy), policy.timeout, "the adapter"
        )
    except TimeoutError as e:
        raise adapter_error(request, str(e)) from None
    adapter = _build(request, config, file, cfg, max_lora_rank)
    adapter.version = where.version
    adapter.source = where.source
    return adapter


def _read(request: LoRARequest, cfg: ModelConfig, policy: ReadPolicy):
    try:
        where = locate(request, policy.roots, policy.cache, _LIMITS)
    except InvalidAdapterError:
        raise
    except Exception as e:  # the hub client and the stores raise many kinds; keep the cause
        path = request.lora_path
        what = (
            f"path {path!r} is not a local folder and could not be fetched as a hub repo"
            if source_of(path) == "hub"
            else f"cannot fetch the adapter from {path!r}"
        )
        raise adapter_error(request, f"{what} ({type(e).__name__}: {e})") from e
    config = _read_config(request, where, policy.walk)
    _check_config(request, config, cfg)  # before the weights are read
    return where, config, _read_weights(request, where, policy.walk)


def adapter_error(request: LoRARequest, cause: str) -> InvalidAdapterError:
    """The error for ``request``'s adapter, naming it (name, id, path) and the cause."""
    return InvalidAdapterError(
        f"adapter {request.lora_name!r} (id {request.lora_int_id}, "
        f"path {request.lora_path}): {cause}"
    )


CONFIG_MAX_BYTES = 1 << 20  # adapter_config.json is a few hundred bytes; PEFT's biggest, KBs
BIN_MAX_BYTES = 8 << 30  # adapter_model.bin, read whole by torch.load


_LIMITS = {"adapter_config.json": CONFIG_MAX_BYTES, "adapter_model.bin": BIN_MAX_BYTES}


def _open_regular(
    request: LoRARequest, where: Location, name: str, limit: int, walk: bool
) -> BinaryIO:
    """``name`` in the adapter's folder opened as untrusted input (``open_regular``); a
    refusal names the adapter. ``FileNotFoundError`` if it is not there."""
    try:
        return open_regular(where.root, where.rel(name), limit, walk)
    except RefusedFile as e:
        raise adapter_error(request, f"{name} {e}") from None


def _read_config(request: LoRARequest, where: Location, walk: bool) -> dict[str, Any]:
    name = "adapter_config.json"
    try:
        with _open_regular(request, where, name, CONFIG_MAX_BYTES, walk) as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:  # it grew after the check
            raise adapter_error(request, f"{name} is over {CONFIG_MAX_BYTES} bytes")
        config = json.loads(data.decode("utf-8"))
    except InvalidAdapterError:
        raise
    except FileNotFoundError:
        raise adapter_error(request, f"no {name} in {where.root}/{where.folder}") from None
    except (OSError, ValueError, RecursionError) as e:  # JSON, UTF-8, nesting
        raise adapter_error(request, f"{name} is malformed ({e})") from e
    if not isinstance(config, dict):
        raise adapter_error(request, f"{name} is malformed (not a JSON object)")
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


def _read_weights(request: LoRARequest, where: Location, walk: bool) -> AdapterFile:
    """The weights file, read once beneath the root (without the GIL); a PyTorch
    ``adapter_model.bin`` is converted to the same form."""
    st = "adapter_model.safetensors"
    try:
        try:
            return AdapterFile.read(where.rel(st), root=where.root, walk=walk)
        except FileNotFoundError:
            pass  # then the PyTorch file
        except PermissionError as e:  # refused beneath the root
            raise adapter_error(request, f"{st} is refused: {e}") from None
        try:
            f = _open_regular(request, where, "adapter_model.bin", BIN_MAX_BYTES, walk)
        except FileNotFoundError:
            raise adapter_error(
                request,
                f"no adapter_model.safetensors or adapter_model.bin in {where.root}/{where.folder}",
            ) from None
        with f:
            tensors = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise adapter_error(
                request, "the adapter weights are not a mapping of names to tensors"
            )
        from safetensors.torch import save

        return AdapterFile.from_bytes(save({k: v.clone() for k, v in tensors.items()}))
    except InvalidAdapterError:
        raise
    except Exception as e:  # corrupt files raise many kinds; keep the cause
        raise adapter_error(
            request, f"cannot read adapter weights ({type(e).__name__}: {e})"
        ) from e


def _check_regex(request: LoRARequest, what: str, pattern: Any) -> None:
    """A pattern the linear-time engine reads (Rust's ``regex``: no look-around or
    back-references, a bounded compiled size); never Python's backtracking ``re``."""
    if not isinstance(pattern, str):
        raise adapter_error(
            request, f"adapter_config.json: {what} {pattern!r:.200} is not a regex string"
        )
    try:
        ModulePatterns([pattern])
    except ValueError as e:
        raise adapter_error(
            request,
            f"adapter_config.json: {what} {pattern!r:.200} is not a regex loraplex matches "
            f"in linear time ({str(e):.400})",
        ) from None


def _is_positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


class _Patterns:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a module
    key's tail gives its value (matched in linear time, compiled once per adapter)."""

    def __init__(self, patterns: dict[str, Any] | None):
        self.values = list((patterns or {}).values())
        self.compiled = ModulePatterns(list(patterns)) if patterns else None

    def value(self, key: str, default: float) -> float:
        hit = self.compiled.first_match(key) if self.compiled is not None else None
        return default if hit is None else self.values[hit]


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _as_float32(x: float) -> float:
    """``x`` rounded to float32 (inf beyond its range), as torch computes ``b * scale``."""
    return array("f", [x])[0]


@dataclass(frozen=True)
class _Module:
    """One module of a validated layout: where its weights lie, and its scaling."""

    key: tuple[int, str]
    name: str
    a: int
    b: int
    rank: int
    alpha: float
    scale: float


class Layout:
    """The modules of one validated header under one config, sorted by (layer, module):
    adapters trained with one recipe share it, and slots plan their copies once per layout.
    Compared by identity."""

    def __init__(self, modules: tuple[_Module, ...]):
        self.modules = modules
        self.rank = max(m.rank for m in modules)
        self.b_tensors = [m.b for m in modules]
        # the largest factor any module scales its B by, rounded as the products are: with
        # the largest B magnitude under it, no scaled B overflows (the check of each load)
        self.max_scale = max(_as_float32(m.scale) for m in modules)


def _scaled(b_max: float, scale: float) -> float:
    """``b_max * scale`` as float32 computes it (inf beyond its range)."""
    return _as_float32(b_max * _as_float32(scale)) if math.isfinite(scale) else scale


# validated layouts, by (header, config, max_lora_rank, model config): the loader checks only
# each file's magnitudes against a layout it has seen; the model config is held with its
# layouts so that its id is not reused while they are cached
_LAYOUTS: dict[tuple, tuple[ModelConfig, Layout]] = {}
_MAX_LAYOUTS = 64


def _build(request, c, file: AdapterFile, cfg: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    """Validates the adapter from its file's header (names, dtypes, shapes; once per distinct
    header and config) and the largest magnitude the read measured in each weight."""
    cache_key = (file.header(), json.dumps(c, sort_keys=True), max_lora_rank, id(cfg))
    cached = _LAYOUTS.get(cache_key)
    if cached is None:
        layout = Layout(_layout(request, c, file.tensors(), cfg, max_lora_rank))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[cache_key] = (cfg, layout)
    else:
        _, layout = cached
    maxes = file.max_abs()
    # every tensor of the file is a module's A or B: their sum is finite only if each is,
    # and the largest B under the largest scale bounds every scaled B (two passes over a
    # list; module by module, to name the culprit, only when a bound fails: 0.16 -> 0.02 ms
    # for a 120-module adapter)
    b_largest = max(maxes[i] for i in layout.b_tensors)
    if not (math.isfinite(sum(maxes)) and math.isfinite(_scaled(b_largest, layout.max_scale))):
        _check_magnitudes(request, layout, maxes)
    return LoRAAdapter(request, layout, maxes, file)


def _check_magnitudes(request, layout: Layout, maxes: list[float]) -> None:
    """Raises for the first module (by layer, then module) with a non-finite weight, or whose
    scaling makes lora_B non-finite."""
    for m in layout.modules:
        a_max, b_max = maxes[m.a], maxes[m.b]
        if not (math.isfinite(a_max) and math.isfinite(b_max)):
            raise adapter_error(request, f"{m.name} has non-finite values (NaN or inf)")
        if not math.isfinite(_scaled(b_max, m.scale)):
            raise adapter_error(
                request,
                f"{m.name}: scaling lora_alpha / r = {m.alpha} / {m.rank} makes lora_B non-finite",
            )


def _layout(request, c, entries, cfg: ModelConfig, max_lora_rank: int):
    """The modules of a header (``AdapterFile.tensors()``) under config ``c``, checked: names,
    dtypes, shapes, ranks. Returns them sorted by (layer, module)."""
    parts: dict[tuple[int, str], dict[str, int]] = {}
    for index, (key, *_) in enumerate(entries):
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
        parts.setdefault((layer, module), {})[ab] = index
    if not parts:
        raise adapter_error(request, "the adapter has no LoRA weights")
    layout = []
    ranks, alphas = _Patterns(c.get("rank_pattern")), _Patterns(c.get("alpha_pattern"))
    for (layer, module), ab in sorted(parts.items()):
        name = f"model.layers.{layer}.{_block(module)}.{module}"
        if set(ab) != {"A", "B"}:
            raise adapter_error(
                request, f"{name} has lora_{''.join(ab)} but not both lora_A and lora_B"
            )
        _, a_dtype, a_shape, _ = entries[ab["A"]]
        _, b_dtype, b_shape, _ = entries[ab["B"]]
        if a_dtype not in _FLOAT_DTYPES or b_dtype not in _FLOAT_DTYPES:
            raise adapter_error(
                request,
                f"{name}: lora_A / lora_B must be floating point, got {a_dtype} / {b_dtype}",
            )
        fan_in, fan_out = module_shape(cfg, module)
        r = a_shape[0] if a_shape else 0
        if len(a_shape) != 2 or a_shape[1] != fan_in or b_shape != [fan_out, r]:
            raise adapter_error(
                request,
                f"{name}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} do not fit the "
                f"base model's {module} ({fan_in} -> {fan_out}); "
                f"expected [r, {fan_in}] and [{fan_out}, r]",
            )
        expected_r = ranks.value(name, c["r"])
        if r != expected_r:
            raise adapter_error(
                request, f"{name}: lora_A has rank {r} but the config says {expected_r}"
            )
        if r > max_lora_rank:
            raise adapter_error(
                request, f"rank {r} ({name}) is above max_lora_rank={max_lora_rank}"
            )
        alpha = alphas.value(name, c["lora_alpha"])
        if r < 1:
            raise adapter_error(request, f"{name}: lora_A has rank 0")
        scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        layout.append(_Module((layer, module), name, ab["A"], ab["B"], r, alpha, scale))
    return tuple(layout)
