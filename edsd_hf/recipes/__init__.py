"""Recipes that build the project's own target and draft language models from the Python standard library source."""

from .corpus import build_lm_blocks, collect_stdlib_files, train_tokenizer
from .target import TARGET_SIZES, TargetSize, evaluate_checkpoint, load_or_train_target, read_report, train_target

__all__ = [
    "TARGET_SIZES",
    "TargetSize",
    "build_lm_blocks",
    "collect_stdlib_files",
    "evaluate_checkpoint",
    "load_or_train_target",
    "read_report",
    "train_target",
    "train_tokenizer",
]
