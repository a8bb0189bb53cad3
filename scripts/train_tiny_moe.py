"""Train the small Mixtral-architecture MoE that `mer demo` runs, on Python's own stdlib source.

Reproducible: seeded, deterministic data order, a fixed number of steps. Runs
on CPU in about half an hour on 2 cores. Writes a Hugging Face checkpoint
(config.json, bf16 safetensors, tokenizer.json, tokenizer_config.json) and a
model card with the held-out figures.

    .venv/bin/python scripts/train_tiny_moe.py --out models/stdlib-moe

`--size draft` trains the much smaller draft model that speculative decoding
pairs with it (`src/mer/data/stdlib-moe-draft`), on the same tokenizer
(`--tokenizer DIR` reuses a checkpoint's tokenizer.json instead of training one).

Needs the test extras (transformers): training uses its MixtralForCausalLM, so
the shipped weights are exactly what the reference implementation computes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from mer.synth.tokenizer import train_tokenizer

SIZES = {
    "base": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, num_local_experts=8),
    "draft": dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
}  # fmt: skip
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}


def corpus(held_out_every: int = 20) -> tuple[list[Path], list[Path]]:
    """The stdlib's .py files (no test suites), split by a hash of the path: train, held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    held = [
        p for p in files if int(hashlib.sha1(p.name.encode()).hexdigest(), 16) % held_out_every == 0
    ]
    train = [p for p in files if p not in set(held)]
    return train, held


def encode(tok: Tokenizer, files: list[Path]) -> np.ndarray:
    """All files as one token stream: <s> file </s> <s> file </s> ..."""
    ids: list[int] = []
    for p in files:
        ids += tok.encode(p.read_text(errors="replace")).ids + [2]
    return np.array(ids, dtype=np.int64)


def batches(data: np.ndarray, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen).numpy()
        x = np.stack([data[s : s + seq + 1] for s in starts])
        yield torch.from_numpy(x)


@torch.no_grad()
def held_out_loss(model, data: np.ndarray, seq: int, max_windows: int = 256) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq)
    losses = []
    for i in range(0, n, 16):
        chunk = [data[j * seq : j * seq + seq + 1] for j in range(i, min(n, i + 16))]
        x = torch.from_numpy(np.stack(chunk))
        logits = model(x[:, :-1]).logits.float()
        losses.append(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
        )
    model.train()
    return sum(losses) / (n * seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("src/mer/data/stdlib-moe"))
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-loss", type=float, default=0.02, help="router load-balancing weight")
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--tokenizer", type=Path, help="reuse this checkpoint's tokenizer.json")
    args = ap.parse_args()

    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    train_files, held_files = corpus()
    if args.tokenizer:
        tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    else:
        tok = train_tokenizer(args.vocab, train_files)
    train, held = encode(tok, train_files), encode(tok, held_files)
    print(f"corpus: {len(train_files)} files, {len(train)} train tokens; "
          f"{len(held_files)} files, {len(held)} held-out tokens", flush=True)  # fmt: skip

    config = MixtralConfig(
        vocab_size=tok.get_vocab_size(), **SIZES[args.size],
        num_experts_per_tok=2, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5, router_aux_loss_coef=args.aux_loss,
        output_router_logits=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train, args.seq, args.batch, gen)
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(data)
        loss = model(x, labels=x).loss  # shifted inside; includes the router balance loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{el / 60:.1f} min", flush=True)  # fmt: skip
    minutes = (time.perf_counter() - t0) / 60

    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    held_loss = held_out_loss(model.float(), held, args.seq)
    print(f"held-out loss {held_loss:.3f} nats/token, perplexity {math.exp(held_loss):.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 1024,
    }, indent=2) + "\n")  # fmt: skip
    (args.out / "training.json").write_text(json.dumps({
        "size": args.size, "params": params, "steps": args.steps, "batch": args.batch,
        "seq": args.seq, "lr": args.lr, "seed": args.seed, "aux_loss": args.aux_loss,
        "train_tokens": int(len(train)),
        "held_out_tokens": int(len(held)), "tokens_seen": args.steps * args.batch * args.seq,
        "train_minutes": round(minutes, 1), "held_out_loss": round(held_loss, 4),
        "held_out_perplexity": round(math.exp(held_loss), 2),
        "held_out_files": [p.name for p in held_files],
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
