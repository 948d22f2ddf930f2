"""PEFT LoRA adapters for the tiny models, saved with ``save_pretrained``. lora_B starts at
zero in PEFT; here both A and B are drawn at random so every adapter changes the output."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(
    base: Path, out: Path, *, r=8, alpha=16, targets=ALL, seed=0, std=0.3, **extra
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **extra
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    return out


class PeftReference:
    """transformers + PEFT with several adapters loaded; logits per adapter name."""

    def __init__(self, base: Path, adapters: dict[str, Path]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        names = list(adapters)
        self.model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()

    @torch.no_grad()
    def logits(self, adapter: str | None, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(x).logits[0].float()
        self.model.set_adapter(adapter)
        return self.model(x).logits[0].float()

    def mismatches(self, outputs, adapter_names: list[str | None]) -> list[str]:
        """Greedy tokens that are not PEFT's argmax (ties within 1e-4) for their adapter."""
        bad = []
        for out, name in zip(outputs, adapter_names):
            prompt, gen = list(out.prompt_token_ids), out.outputs[0].token_ids
            logits = self.logits(name, prompt + gen)
            for t, tok in enumerate(gen):
                row = logits[len(prompt) - 1 + t]
                if row[tok] < row.max() - 1e-4:
                    bad.append(
                        f"{out.request_id} ({name}) token {t}: {tok} vs best {int(row.argmax())}"
                    )
        return bad


def edit_config(folder: Path, **changes) -> None:
    """Overwrites fields of a saved adapter's adapter_config.json."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def build_corrupt_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A PEFT adapter folder whose weights file is not safetensors (its config is valid)."""
    build_adapter(base, folder, seed=seed)
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def edit_weights(folder: Path, fn) -> None:
    """Applies ``fn`` to a saved adapter's tensors (a dict, edited in place) and saves them."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def first_key(tensors, part: str) -> str:
    """The first tensor name (sorted) containing ``part``."""
    return next(k for k in sorted(tensors) if part in k)


def lora_requests(base: Path, root: Path, prefix: str, n: int, seed: int) -> list:
    """``n`` adapters built under ``root`` (``{prefix}{i}``, seeds ``seed + i``), as
    ``LoRARequest``s with ids 1..n."""
    from loraplex import LoRARequest

    return [
        LoRARequest(
            f"{prefix}{i}", i + 1, str(build_adapter(base, root / f"{prefix}{i}", seed=seed + i))
        )
        for i in range(n)
    ]
