"""Training data for EDSD drafts: loading, chat formatting, tokenization, regeneration and batching.

Every example becomes `input_ids`, `attention_mask` and `loss_mask` in the target tokenizer's
vocabulary. `loss_mask[j] = 1` when token j is one the draft is trained to predict: every token of
plain text, and only the assistant tokens of a chat (prompts and system turns are context).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

# File suffix -> `datasets` builder name.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}

DATA_FORMATS = ("messages", "sharegpt", "text")

# ShareGPT speaker names -> chat-template roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# The `{% generation %}` block tag that lets `apply_chat_template` return an assistant-token mask.
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

OVERFLOW_ACTIONS = ("truncate", "drop", "error")

# The draft predicts token t+2 from the target features at t, so a sequence needs 3 tokens for one loss position.
MIN_SEQUENCE_LENGTH = 3


# ----- loading --------------------------------------------------------------------------------


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    """Return the `datasets` builder and the files of a local file or directory."""
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_FILE_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ValueError(
            f"No data files in directory {str(path)!r}: expected files ending in {', '.join(DATA_FILE_BUILDERS)}."
        )
    suffixes = {p.suffix for p in files}
    unknown = suffixes - DATA_FILE_BUILDERS.keys()
    if unknown:
        raise ValueError(
            f"Unsupported data file {str(files[0])!r}: expected a file ending in {', '.join(DATA_FILE_BUILDERS)}."
        )
    builders = {DATA_FILE_BUILDERS[suffix] for suffix in suffixes}
    if len(builders) > 1:
        raise ValueError(f"Data directory {str(path)!r} mixes file types {sorted(suffixes)}: use one type.")
    return builders.pop(), [str(p) for p in files]


def load_raw_dataset(data: str | Path, split: str = "train") -> datasets.Dataset:
    """Load `data` with `datasets`: a local JSON, JSONL, parquet or text file, a directory of them, or a Hub id.

    Raises a `ValueError` naming `data` when it cannot be read or has no rows.
    """
    path = Path(data).expanduser()
    if path.exists():
        builder, files = _local_data_files(path)
        description = f"data file {str(path)!r}"
        load_arguments = {"path": builder, "data_files": files, "split": "train"}
    else:
        if str(data).endswith(tuple(DATA_FILE_BUILDERS)):
            raise ValueError(f"Data file {str(data)!r} not found.")
        description = f"Hub dataset {str(data)!r} (split {split!r})"
        load_arguments = {"path": str(data), "split": split}

    try:
        dataset = datasets.load_dataset(**load_arguments)
    # `datasets` raises builder-specific errors (JSON decoding, Arrow, network, missing files), all reported alike.
    except Exception as err:
        raise ValueError(f"Could not read {description}: {err}") from err
    if len(dataset) == 0:
        raise ValueError(f"The {description} contains no rows.")
    return dataset


def detect_data_format(dataset: datasets.Dataset) -> str:
    """Return `"messages"`, `"sharegpt"` (a `conversations` column of `from`/`value` turns) or `"text"`."""
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"Cannot tell the data format from the columns {sorted(columns)}: expected `messages` (chat turns with "
        "`role` and `content`), `conversations` (ShareGPT turns with `from` and `value`) or `text`."
    )


def to_chat_messages(turns: Sequence[dict], data_format: str) -> list[dict]:
    """Convert one conversation to `[{"role": ..., "content": ...}]`."""
    if data_format == "messages":
        return [{"role": turn["role"], "content": turn["content"]} for turn in turns]
    messages = []
    for turn in turns:
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"Unknown ShareGPT speaker {speaker!r}: expected one of {sorted(SHAREGPT_ROLES)}."
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def read_examples(dataset: datasets.Dataset, data_format: str | None = None) -> tuple[str, list]:
    """Return the data format and its examples: lists of chat messages, or strings of plain text."""
    data_format = data_format or detect_data_format(dataset)
    if data_format not in DATA_FORMATS:
        raise ValueError(f"Invalid data format {data_format!r}: expected one of {DATA_FORMATS}.")
    if data_format == "text":
        return data_format, [text for text in dataset["text"] if text]
    column = "messages" if data_format == "messages" else "conversations"
    return data_format, [to_chat_messages(turns, data_format) for turns in dataset[column] if turns]


# ----- tokenization ---------------------------------------------------------------------------


def _uses_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return GENERATION_TAG.search(template) is not None


def _assistant_char_spans(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return the text with the character span of each assistant turn.

    A turn's span runs from the end of the prompt rendered with `add_generation_prompt=True` to the end of
    the conversation rendered through that turn, so it includes the template's end-of-turn tokens, which
    the draft must also learn to propose.
    """
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(before) and full_text.startswith(through)):
            raise ValueError(
                f"The chat template of tokenizer {tokenizer.name_or_path!r} does not render a conversation as a "
                "growing prefix of itself, so its assistant tokens cannot be located. Use a template that marks "
                "assistant turns with {% generation %} ... {% endgeneration %}."
            )
        spans.append((len(before), len(through)))
    return full_text, spans


def tokenize_conversation(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Tokenize a conversation with the tokenizer's chat template; the loss mask covers assistant tokens only."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"Tokenizer {tokenizer.name_or_path!r} has no chat template, so chat data cannot be formatted. Set "
            "`tokenizer.chat_template` or use plain-text data."
        )
    if _uses_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        input_ids = list(encoded["input_ids"])
        return {"input_ids": input_ids, "loss_mask": [int(bit) for bit in encoded["assistant_masks"]]}

    text, spans = _assistant_char_spans(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    loss_mask = []
    for token_start, _token_end in encoded["offset_mapping"]:
        loss_mask.append(int(any(start <= token_start < end for start, end in spans)))
    return {"input_ids": list(encoded["input_ids"]), "loss_mask": loss_mask}


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize plain text and split it into consecutive chunks of at most `max_length` tokens, all trained on."""
    input_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    chunks = []
    for start in range(0, len(input_ids), max_length):
        chunk = input_ids[start : start + max_length]
        if len(chunk) >= MIN_SEQUENCE_LENGTH:
            chunks.append({"input_ids": chunk, "loss_mask": [1] * len(chunk)})
    return chunks


def check_max_length(max_length: int | None, target_max_positions: int | None) -> int:
    """Return the sequence length limit, defaulting to the target's context; reject one beyond it."""
    if max_length is None:
        if target_max_positions is None:
            raise ValueError("Pass max_length: the target config sets no max_position_embeddings.")
        return target_max_positions
    if max_length < MIN_SEQUENCE_LENGTH:
        raise ValueError(f"max_length={max_length} is too short: a draft needs at least {MIN_SEQUENCE_LENGTH} tokens.")
    if target_max_positions is not None and max_length > target_max_positions:
        raise ValueError(
            f"max_length={max_length} is longer than the target's context (max_position_embeddings="
            f"{target_max_positions}). Pass max_length <= {target_max_positions}."
        )
    return max_length


def tokenize_examples(
    examples: list,
    data_format: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overflow: str = "truncate",
) -> datasets.Dataset:
    """Tokenize chat or text examples into a dataset of `input_ids`, `attention_mask` and `loss_mask`.

    Plain text longer than `max_length` is split into chunks. A conversation longer than `max_length` is
    truncated, dropped or rejected, as set by `overflow`. Conversations without assistant tokens are skipped;
    data without any raises a `ValueError`.
    """
    if overflow not in OVERFLOW_ACTIONS:
        raise ValueError(f"Invalid overflow {overflow!r}: expected one of {OVERFLOW_ACTIONS}.")

    rows = []
    num_without_assistant = num_overflowing = 0
    for index, example in enumerate(tqdm(examples, desc="Tokenizing", disable=len(examples) < 1000)):
        if data_format == "text":
            rows.extend(tokenize_text(example, tokenizer, max_length))
            continue

        row = tokenize_conversation(example, tokenizer)
        if not any(row["loss_mask"]):
            num_without_assistant += 1
            continue
        if len(row["input_ids"]) > max_length:
            num_overflowing += 1
            if overflow == "error":
                raise ValueError(
                    f"Conversation {index} is {len(row['input_ids'])} tokens long, longer than max_length={max_length}. "
                    "Pass a larger max_length (up to the target's context), or overflow='truncate' or 'drop'."
                )
            if overflow == "drop":
                continue
            row = {key: values[:max_length] for key, values in row.items()}
            if not any(row["loss_mask"]):
                continue
        rows.append(row)

    if data_format != "text" and num_without_assistant == len(examples):
        raise ValueError(
            f"None of the {len(examples)} conversations has an assistant turn: there is nothing to train the draft on."
        )
    if num_without_assistant:
        logger.warning("Skipped %d conversations without assistant turns.", num_without_assistant)
    if num_overflowing:
        logger.warning(
            "%d conversations were longer than max_length=%d (overflow=%r).", num_overflowing, max_length, overflow
        )
    if not rows:
        raise ValueError(f"No training sequence of at least {MIN_SEQUENCE_LENGTH} tokens was produced from the data.")

    for row in rows:
        row["attention_mask"] = [1] * len(row["input_ids"])
    return datasets.Dataset.from_list(rows)


# ----- augmentation and regeneration ----------------------------------------------------------


def augment_system_prompts(
    conversations: list[list[dict]], system_prompts: Sequence[str], probability: float = 0.5, seed: int = 0
) -> list[list[dict]]:
    """Give a random `probability` share of conversations a system prompt drawn from `system_prompts`.

    An existing system turn is replaced, otherwise one is inserted first. Training on varied system prompts
    makes the draft's acceptance less sensitive to the system prompt used at inference.
    """
    if not system_prompts:
        raise ValueError("system_prompts is empty: pass at least one system prompt.")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}.")
    rng = random.Random(seed)
    augmented = []
    for messages in conversations:
        messages = [dict(message) for message in messages]
        if rng.random() < probability:
            system_turn = {"role": "system", "content": rng.choice(list(system_prompts))}
            if messages and messages[0]["role"] == "system":
                messages[0] = system_turn
            else:
                messages.insert(0, system_turn)
        augmented.append(messages)
    return augmented


def _generate_batch(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], generation_kwargs: dict
) -> list[list[int]]:
    """Generate continuations of left-padded token prompts; return the new tokens of each, up to end of sequence."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("Regeneration needs a pad or eos token: set tokenizer.pad_token.")
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1

    device = target.device
    with torch.no_grad():
        output = target.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pad_token_id=pad_token_id,
            **generation_kwargs,
        )

    eos_token_id = target.generation_config.eos_token_id
    if eos_token_id is None:
        eos_ids = set()
    elif isinstance(eos_token_id, list):
        eos_ids = set(eos_token_id)
    else:
        eos_ids = {eos_token_id}
    continuations = []
    for sequence in output[:, width:].tolist():
        tokens = []
        for token in sequence:
            tokens.append(token)
            if token in eos_ids:
                break
        # Without an eos the row may end in padding added after other rows finished.
        while tokens and tokens[-1] == pad_token_id and pad_token_id not in eos_ids:
            tokens.pop()
        continuations.append(tokens)
    return continuations


def regenerate_chat_responses(
    conversations: list[list[dict]],
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[list[dict]]:
    """Replace every assistant turn with the target's own response to the turns before it.

    Drafts trained on the target's own outputs accept more tokens at inference. Conversations are
    regenerated turn by turn: the k-th assistant turn of every conversation is generated in batches once the
    earlier turns are regenerated.
    """
    conversations = [[dict(message) for message in messages] for messages in conversations]
    generation_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        generation_kwargs["temperature"] = temperature

    assistant_positions = [
        [index for index, message in enumerate(messages) if message["role"] == "assistant"] for messages in conversations
    ]
    total_turns = sum(len(positions) for positions in assistant_positions)
    max_turns = max((len(positions) for positions in assistant_positions), default=0)
    with tqdm(total=total_turns, desc="Regenerating responses with the target") as progress:
        for turn in range(max_turns):
            jobs = [(i, positions[turn]) for i, positions in enumerate(assistant_positions) if len(positions) > turn]
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                prompts = [
                    tokenizer.apply_chat_template(
                        conversations[i][:position], tokenize=True, add_generation_prompt=True, return_dict=True
                    )["input_ids"]
                    for i, position in batch
                ]
                responses = _generate_batch(target, tokenizer, prompts, generation_kwargs)
                for (i, position), response in zip(batch, responses):
                    conversations[i][position]["content"] = tokenizer.decode(response, skip_special_tokens=True)
                progress.update(len(batch))
    return conversations


def regenerate_text(
    texts: list[str],
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_tokens: int = 32,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[dict[str, list[int]]]:
    """Continue the first `prompt_tokens` tokens of each text with the target; return tokenized examples.

    The examples keep the target's token ids (no decode and re-encode), and the loss covers every token.
    """
    generation_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        generation_kwargs["temperature"] = temperature
    prompts = [tokenizer(text, add_special_tokens=True)["input_ids"][:prompt_tokens] for text in texts]
    prompts = [prompt for prompt in prompts if prompt]

    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Regenerating text with the target"):
        batch = prompts[start : start + batch_size]
        for prompt, continuation in zip(batch, _generate_batch(target, tokenizer, batch, generation_kwargs)):
            input_ids = prompt + continuation
            if len(input_ids) >= MIN_SEQUENCE_LENGTH:
                rows.append({"input_ids": input_ids, "loss_mask": [1] * len(input_ids)})
    return rows


# ----- batching -------------------------------------------------------------------------------


@dataclass
class EdsdDataCollator:
    """Pad `input_ids`, `attention_mask` and `loss_mask` on the right to the longest example of the batch.

    Right padding keeps every sequence at positions 0..L-1, the positions the target and the draft's
    unrolled training forward both assume.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
            "loss_mask": torch.zeros((len(features), length), dtype=torch.long),
        }
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            batch["input_ids"][row, :size] = torch.as_tensor(feature["input_ids"])
            batch["attention_mask"][row, :size] = torch.as_tensor(feature.get("attention_mask", [1] * size))
            batch["loss_mask"][row, :size] = torch.as_tensor(feature.get("loss_mask", [1] * size))
        return batch


__all__ = [
    "EdsdDataCollator",
    "augment_system_prompts",
    "check_max_length",
    "detect_data_format",
    "load_raw_dataset",
    "read_examples",
    "regenerate_chat_responses",
    "regenerate_text",
    "tokenize_conversation",
    "tokenize_examples",
    "tokenize_text",
]
