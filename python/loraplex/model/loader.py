"""From a folder or hub id to a model with its weights: safetensors (single or sharded),
q/k/v and gate/up merged into single projections."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.engine.backend import Backend
from loraplex.model.config import ModelConfig
from loraplex.model.llama import PROJECTIONS, LlamaForCausalLM
from loraplex.model.rope import RotaryEmbedding

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_path(model: str) -> Path:
    """A local folder as is; anything else as a hub repo id, through huggingface_hub's cache
    (``HF_HUB_OFFLINE=1`` resolves only repos already cached)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model path {model!r} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "tokenizer*"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many kinds; the cause is kept below
        raise FileNotFoundError(
            f"model {model!r} is not a local folder and could not be resolved as a hub repo "
            f"id ({type(e).__name__}: {e})"
        ) from e


def iter_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {folder}: loraplex loads "
            "safetensors checkpoints"
        )
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


def load_model(folder: Path, cfg: ModelConfig, backend: Backend, max_positions: int):
    """The model in ``backend``'s dtype, on its device, laid out for its kernels."""
    dtype = backend.dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, max_positions, dtype)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=backend.device)
    rope = RotaryEmbedding(*model.rope_args)
    for layer in model.layers:
        layer.self_attn.rope = rope
    _load_weights(model, folder, cfg)
    return backend.prepare_model(model)


def _load_weights(model: LlamaForCausalLM, folder: Path, cfg: ModelConfig) -> None:
    params = dict(model.named_parameters())
    pending = {name: _num_shards(name) for name in params}
    unexpected = []
    for key, tensor in iter_weights(folder):
        name = key.removeprefix("model.")
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        target, shard = name, None
        for proj, (merged, index) in PROJECTIONS.items():
            if merged != proj and f".{proj}." in name:
                target, shard = name.replace(f".{proj}.", f".{merged}."), index
        param = params.get(target)
        if param is None:
            unexpected.append(key)
            continue
        dest = param.data if shard is None else _shard(param.data, target, shard, cfg)
        if dest.shape != tensor.shape:
            raise ValueError(
                f"weight {key!r} in {folder} has shape {tuple(tensor.shape)}, but the model's "
                f"config needs {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        pending[target] -= 1
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        pending["lm_head.weight"] = 0
    missing = sorted(n for n, left in pending.items() if left > 0)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {folder} does not match {cfg.architecture}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def _num_shards(param_name: str) -> int:
    if ".qkv_proj." in param_name:
        return 3
    if ".gate_up_proj." in param_name:
        return 2
    return 1


def _shard(data: torch.Tensor, name: str, index: int, cfg: ModelConfig) -> torch.Tensor:
    if ".qkv_proj." in name:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        sizes = [q, kv, kv]
    else:
        sizes = [cfg.intermediate_size] * 2
    return data.narrow(0, sum(sizes[:index]), sizes[index])
