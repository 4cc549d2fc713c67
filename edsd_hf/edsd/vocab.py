"""Draft vocabulary: the target tokens the draft's LM head predicts, chosen by frequency in the training data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)


def count_token_frequencies(
    examples: Iterable[dict], vocab_size: int, loss_tokens_only: bool = True, show_progress: bool = True
) -> torch.LongTensor:
    """Count how often each target token id occurs in tokenized examples.

    Each example has `input_ids` and, optionally, `loss_mask` (1 for tokens the draft is trained to
    predict). With `loss_tokens_only`, only those tokens are counted: they are the tokens the draft
    must propose, and a chat prompt's template tokens would otherwise crowd out response tokens.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for example in tqdm(examples, desc="Counting token frequencies", disable=not show_progress):
        input_ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        if loss_tokens_only and example.get("loss_mask") is not None:
            input_ids = input_ids[torch.as_tensor(example["loss_mask"], dtype=torch.bool)]
        if input_ids.numel() == 0:
            continue
        if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
            raise ValueError(
                f"Token id {int(input_ids.max())} is outside the target vocabulary of size {vocab_size}: the data "
                "was tokenized with another tokenizer than the target's."
            )
        counts += torch.bincount(input_ids, minlength=vocab_size)
    return counts


def select_draft_vocab(token_counts: torch.LongTensor, draft_vocab_size: int) -> torch.LongTensor:
    """Return the `draft_vocab_size` most frequent target token ids, sorted by id (the draft's `d2t`).

    Ties, and the unseen tokens that fill the vocabulary when the data has fewer distinct tokens, are
    taken in order of increasing id, so the result does not depend on the order of the data.
    """
    vocab_size = token_counts.numel()
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} must be between 1 and the target vocabulary size ({vocab_size})."
        )
    # A stable sort of the negated counts keeps equal counts in increasing id order.
    order = torch.sort(-token_counts, stable=True).indices
    draft_to_target = order[:draft_vocab_size].sort().values

    num_seen = int((token_counts > 0).sum())
    covered = int(token_counts[draft_to_target].sum())
    total = int(token_counts.sum())
    if num_seen < draft_vocab_size:
        logger.warning(
            "The training data contains %d distinct tokens, fewer than draft_vocab_size=%d; the rest of the draft "
            "vocabulary is filled with unseen tokens.",
            num_seen,
            draft_vocab_size,
        )
    if total:
        logger.info(
            "Draft vocabulary of %d tokens covers %.2f%% of the counted training tokens.",
            draft_vocab_size,
            100.0 * covered / total,
        )
    return draft_to_target


def build_draft_vocab(
    examples: Iterable[dict],
    vocab_size: int,
    draft_vocab_size: int,
    loss_tokens_only: bool = True,
    show_progress: bool = True,
) -> torch.LongTensor:
    """Count token frequencies in `examples` and return the top `draft_vocab_size` ids, for `draft.set_draft_vocab`."""
    counts = count_token_frequencies(examples, vocab_size, loss_tokens_only=loss_tokens_only, show_progress=show_progress)
    if int(counts.sum()) == 0:
        raise ValueError("Cannot build a draft vocabulary: the training data contains no tokens to predict.")
    return select_draft_vocab(counts, draft_vocab_size)


def draft_vocab_coverage(draft_to_target: torch.LongTensor, token_counts: torch.LongTensor) -> float:
    """Return the fraction of counted tokens that the draft vocabulary contains."""
    total = int(token_counts.sum())
    return float(token_counts[draft_to_target].sum()) / total if total else 0.0


__all__ = ["build_draft_vocab", "count_token_frequencies", "draft_vocab_coverage", "select_draft_vocab"]
