"""A real byte-level BPE tokenizer, trained here on text every machine has offline.

The corpus is a fixed, sorted slice of the Python standard library's own
source: no download, and the same bytes everywhere the same Python runs.
Training takes seconds; the result is cached per vocabulary size. The
tokenizer knows nothing about models beyond Mixtral's special tokens.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mer.errors import ConfigError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials and every byte
CORPUS_BYTES = 3 << 20
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("MER_CACHE_DIR", Path.home() / ".cache" / "mer"))


def corpus_files(limit: int = CORPUS_BYTES) -> list[Path]:
    """Sorted stdlib .py files (tests excluded) up to about `limit` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked, total = [], 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2] or path.name.startswith("test"):
            continue
        picked.append(path)
        total += path.stat().st_size
        if total >= limit:
            break
    return picked


def train_tokenizer(vocab_size: int, files: list[Path] | None = None) -> Tokenizer:
    """Byte-level BPE trained on `files` (default: the stdlib slice of `corpus_files`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = corpus_files() if files is None else files
    texts = (p.read_text(encoding="utf-8", errors="replace") for p in files)
    tok.train_from_iterator(texts, trainer=trainer)
    # As in Mixtral's own tokenizer.json: encoding with special tokens prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (fewer if the corpus runs out of merges)."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"a byte-level tokenizer needs a vocabulary of at least {MIN_VOCAB}, got {vocab_size}"
        )
    # The corpus is this Python's stdlib, so the cache is per Python version.
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    cached = cache_root() / "tokenizers" / f"bpe-stdlib-{py}-{vocab_size}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    tok = train_tokenizer(vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False, suffix=".tmp") as f:
        f.write(tok.to_str())
    os.replace(f.name, cached)
    return tok


def write_tokenizer_files(out_dir: Path, tok: Tokenizer, model_max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json that transformers and mer both read."""
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
