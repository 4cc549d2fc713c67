"""Training corpus built from the Python standard library source of the running interpreter.

Every machine with Python has this text, so the project can train a real language model offline.
Files are split into train and held-out sets by a hash of their path relative to the stdlib root,
so the split is the same on every run and the held-out files never reach the tokenizer or the model.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

logger = logging.get_logger(__name__)

EOS_TOKEN = "<|endoftext|>"

# Per-mille of files that go to the held-out split (20 per mille = about 2% of files).
HELDOUT_PER_MILLE = 20

# Directory names whose contents are test suites or third-party packages, not library code.
EXCLUDED_DIR_NAMES = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

SPLITS = ("train", "heldout")


def stdlib_root() -> Path:
    """Return the directory of the running interpreter's standard library (`Lib/` in a CPython checkout)."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    """Return whether a file belongs to the held-out split, decided by a SHA-256 hash of its POSIX path relative to the stdlib root."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


def _is_library_source(relative_path: Path) -> bool:
    if any(part in EXCLUDED_DIR_NAMES for part in relative_path.parts[:-1]):
        return False
    return not relative_path.name.startswith("test_")


def collect_stdlib_files(split: str = "train", max_files: int | None = None, root: Path | None = None) -> list[Path]:
    """Collect the stdlib `*.py` files of one split, sorted by relative path.

    Test suites (`test/`, `tests/`, `idlelib/idle_test/`, `test_*.py`) and `site-packages` are excluded.
    `max_files` keeps an evenly spaced subset of the sorted list, so a small slice still samples the
    whole library instead of only the modules whose names sort first.
    """
    if split not in SPLITS:
        raise ValueError(f"Invalid split {split!r}: expected one of {SPLITS}.")
    if max_files is not None and max_files < 1:
        raise ValueError(f"Invalid max_files={max_files}: pass a positive count, or None for all files.")
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Standard library directory not found: {root}.")

    want_heldout = split == "heldout"
    files = []
    for path in root.rglob("*.py"):
        relative_path = path.relative_to(root)
        if _is_library_source(relative_path) and is_heldout(relative_path.as_posix()) == want_heldout:
            files.append(path)
    files.sort(key=lambda path: path.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"No {split} source files found under {root}.")

    if max_files is not None and max_files < len(files):
        stride = len(files) / max_files
        files = [files[int(index * stride)] for index in range(max_files)]
    return files


def read_source(path: Path) -> str:
    # Replacing bytes that are not valid UTF-8 keeps one odd file from stopping a whole training run,
    # and the byte-level tokenizer can encode the replacement character like any other.
    return Path(path).read_text(encoding="utf-8", errors="replace")


def iter_sources(files: Sequence[Path], description: str = "Reading") -> Iterator[str]:
    for path in tqdm(files, desc=description, unit="file", leave=False):
        yield read_source(path)


def train_tokenizer(files: Sequence[Path], vocab_size: int, output_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `files` and wrap it for transformers.

    The only special token is `<|endoftext|>`, which serves as EOS, BOS and padding, as in GPT-2.
    Encoding adds no special tokens, so `decode(encode(text)) == text` for any string.
    When `output_dir` is given the tokenizer is saved there, and `AutoTokenizer.from_pretrained(output_dir)`
    loads it without network access.
    """
    if not files:
        raise ValueError("No files to train the tokenizer on: pass at least one source file.")
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_vocab_size = len(byte_alphabet) + 1
    if vocab_size < min_vocab_size:
        raise ValueError(
            f"Invalid vocab_size={vocab_size}: a byte-level BPE needs at least {min_vocab_size} entries "
            f"({len(byte_alphabet)} byte symbols plus {EOS_TOKEN})."
        )

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the first token of a file unchanged, so encoding is lossless.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    logger.info(f"Training a byte-level BPE tokenizer with vocab_size={vocab_size} on {len(files)} files.")
    backend.train_from_iterator(iter_sources(files, "Tokenizer training"), trainer=trainer, length=len(files))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def tokenize_documents(files: Sequence[Path], tokenizer: PreTrainedTokenizerFast, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize `files` into one stream in which every document starts with the EOS token.

    Stops reading files once the stream contains at least `max_tokens` tokens and truncates it to that length.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"The tokenizer has no EOS token: set tokenizer.eos_token (this project uses {EOS_TOKEN!r}).")

    pieces = []
    total = 0
    for text in iter_sources(files, "Tokenizing"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces.append(torch.tensor([eos_id, *ids], dtype=torch.long))
        total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        return torch.empty(0, dtype=torch.long)
    stream = torch.cat(pieces)
    return stream if max_tokens is None else stream[:max_tokens]


def build_lm_blocks(
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerFast,
    block_size: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Tokenize `files`, join them with EOS and cut the stream into blocks for causal-LM training.

    Returns a LongTensor of shape `[num_blocks, block_size]`. The tail that does not fill a whole
    block is dropped. `max_tokens` caps the number of tokens read, and so the number of blocks.
    """
    if block_size < 2:
        raise ValueError(f"Invalid block_size={block_size}: a causal-LM block needs at least 2 tokens.")
    stream = tokenize_documents(files, tokenizer, max_tokens=max_tokens)
    num_blocks = stream.numel() // block_size
    if num_blocks == 0:
        raise ValueError(
            f"The {len(files)} files give {stream.numel()} tokens, fewer than one block of {block_size}: "
            "pass more files, a larger max_tokens or a smaller block_size."
        )
    return stream[: num_blocks * block_size].view(num_blocks, block_size)
