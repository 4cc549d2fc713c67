"""Calibration and evaluation data for HookMoE: text sources turned into fixed-length causal-LM blocks."""

import os
import random
from collections.abc import Sequence

import datasets
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Sources that name a split of the Python standard-library corpus of `edsd_hf.recipes.corpus`.
STDLIB_SOURCES = {"stdlib:train": "train", "stdlib:heldout": "heldout"}

# `datasets` builders for local files, by file extension.
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Documents tokenised per batch while collecting blocks.
_TOKENIZE_BATCH = 32


def load_text_dataset(source: str | Sequence[str] | datasets.Dataset, text_column: str = "text") -> datasets.Dataset:
    """Load text documents as a `datasets.Dataset` with one document per row in `text_column`.

    `source` is one of:
      * a `datasets.Dataset` (returned as is) or a list of strings;
      * `"stdlib:train"` or `"stdlib:heldout"`: one split of the Python standard-library corpus;
      * a directory written by `Dataset.save_to_disk`;
      * a local `.txt`, `.json`, `.jsonl`, `.csv` or `.parquet` file;
      * otherwise a Hub dataset id, loaded with `datasets.load_dataset(source, split="train")`.
    """
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (list, tuple)):
        dataset = datasets.Dataset.from_dict({text_column: list(source)})
    elif source in STDLIB_SOURCES:
        # Imported here: the recipes package is only needed for this source.
        from ..recipes.corpus import collect_stdlib_files, read_source

        files = collect_stdlib_files(STDLIB_SOURCES[source])
        dataset = datasets.Dataset.from_dict({text_column: [read_source(path) for path in files]})
    elif os.path.isdir(source):
        dataset = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        extension = os.path.splitext(source)[1].lower()
        if extension not in _FILE_BUILDERS:
            raise ValueError(
                f"Unsupported data file {source!r}: expected one of {sorted(_FILE_BUILDERS)}, a directory written by "
                "Dataset.save_to_disk, 'stdlib:train' or 'stdlib:heldout'."
            )
        # The `text` builder yields one row per line by default, so ask for one row per file.
        builder_kwargs = {"sample_by": "document"} if _FILE_BUILDERS[extension] == "text" else {}
        dataset = datasets.load_dataset(_FILE_BUILDERS[extension], data_files=source, split="train", **builder_kwargs)
    else:
        dataset = datasets.load_dataset(source, split="train")

    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{source!r} contains several splits ({list(dataset)}). Save or pass a single split.")
    if text_column not in dataset.column_names:
        raise ValueError(
            f"The dataset from {source!r} has no column {text_column!r} (columns: {dataset.column_names}). "
            "Pass the name of the text column."
        )
    return dataset


def build_calibration_dataset(
    tokenizer: PreTrainedTokenizerBase,
    source: str | Sequence[str] | datasets.Dataset,
    num_sequences: int = 256,
    seq_len: int = 256,
    text_column: str = "text",
    seed: int = 0,
) -> datasets.Dataset:
    """Build `num_sequences` causal-LM blocks of `seq_len` tokens from a text source.

    Documents are shuffled with `seed`, joined with the tokenizer's EOS token (when it has one) and cut into
    blocks, so every block is full and needs no padding. Returns a `datasets.Dataset` with `input_ids`,
    `attention_mask` and `labels` (a copy of `input_ids`, which the model shifts). Fewer blocks are returned, with
    a warning, when the source is too short.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be at least 1, got {num_sequences}.")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and one target token), got {seq_len}.")
    dataset = load_text_dataset(source, text_column)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)

    needed = num_sequences * seq_len
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for start in range(0, len(order), _TOKENIZE_BATCH):
        texts = list(dataset.select(order[start : start + _TOKENIZE_BATCH])[text_column])
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(eos + ids)
        if len(stream) >= needed:
            break

    num_blocks = min(num_sequences, len(stream) // seq_len)
    if num_blocks == 0:
        raise ValueError(
            f"The source gives {len(stream)} tokens, fewer than one block of seq_len={seq_len}. Use more text or a "
            "smaller seq_len."
        )
    if num_blocks < num_sequences:
        logger.warning(f"The source fills only {num_blocks} of the {num_sequences} requested blocks of {seq_len} tokens.")
    blocks = [stream[i * seq_len : (i + 1) * seq_len] for i in range(num_blocks)]
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks], "labels": [list(b) for b in blocks]}
    )
