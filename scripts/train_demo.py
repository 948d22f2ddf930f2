"""Trains the demo's tiny model and adapters (run once; the results ship in the package).

The base model copies a lowercase word: ``<s>hello>`` -> ``hello</s>``. Three LoRA adapters,
trained with PEFT on top of it, change what it writes, visibly and checkably:
``upper`` (HELLO), ``shift`` (each letter +1: ifmmp) and ``vowels`` (vowels masked: h*ll*).

    .venv/bin/python scripts/train_demo.py [out_dir]   # default python/loraplex/demo_assets

Needs transformers and peft (test dependencies); takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from loraplex.entrypoints.demo import LETTERS
from loraplex.entrypoints.demo import TASKS as _TASKS

TASKS = {("copy" if k is None else k): v for k, v in _TASKS.items()}
VOCAB = ["<s>", "</s>", ">", "*"] + list(LETTERS) + list(LETTERS.upper())


def build_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="*"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def batch(task: str, n: int, rng: random.Random):
    """Token ids and a loss mask (1 on the answer and EOS) for n random words."""
    seqs, masks = [], []
    # the base model copies any character, so every output token's embedding is trained
    alphabet = LETTERS + LETTERS.upper() + "*" if task == "copy" else LETTERS
    for _ in range(n):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        prompt = [0] + [VOCAB.index(c) for c in word] + [VOCAB.index(">")]
        answer = [VOCAB.index(c) for c in TASKS[task](word)] + [1]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [1] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float)
    return ids, mask


def train(model, task: str, steps: int, lr: float, seed: int) -> None:
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in range(steps):
        ids, mask = batch(task, 64, rng)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none"
        )
        loss = (loss * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"{task} step {step} loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, task: str, n: int = 300) -> float:
    rng = random.Random(12345)
    ok = 0
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 8)))
        ids = [0] + [VOCAB.index(c) for c in word] + [VOCAB.index(">")]
        want = [VOCAB.index(c) for c in TASKS[task](word)] + [1]
        out = []
        for _ in range(len(want)):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
        ok += out == want
    return ok / n


def main() -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("python/loraplex/demo_assets")
    base_dir = out / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    build_tokenizer(base_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    train(model, "copy", steps=3000, lr=3e-3, seed=0)
    print("copy accuracy", accuracy(model, "copy"))
    model.save_pretrained(base_dir)
    for i, task in enumerate(["upper", "shift", "vowels"], start=1):
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        )
        peft_model = get_peft_model(base, lora)
        train(peft_model, task, steps=1000, lr=5e-3, seed=i)
        print(task, "accuracy", accuracy(peft_model, task))
        peft_model.save_pretrained(out / task)
        for extra in (out / task / "README.md",):
            extra.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
