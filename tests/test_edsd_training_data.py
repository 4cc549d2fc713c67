"""EDSD training data: loading, chat formatting with assistant-only loss, regeneration, vocabulary, batching."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edsd_hf.edsd.data import (
    EdsdDataCollator,
    augment_system_prompts,
    check_max_length,
    load_raw_dataset,
    read_examples,
    regenerate_chat_responses,
    regenerate_text,
    tokenize_conversation,
    tokenize_examples,
    tokenize_text,
)
from edsd_hf.edsd.vocab import build_draft_vocab, count_token_frequencies, select_draft_vocab


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# The same layout with assistant turns marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE_WITH_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ message['content'] }} <|end|> {% endgeneration %}{% else %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "<|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

WORDS = "hello there hi friend how are you fine thanks what is the time now be brief and kind code def return".split()


def make_chat_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on a few strings, with special tokens for the chat template."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_target_for(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


CONVERSATION = [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi friend"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


# ----- chat formatting --------------------------------------------------------------------------


def test_chat_loss_mask_covers_assistant_tokens_only():
    tokenizer = make_chat_tokenizer()
    row = tokenize_conversation(CONVERSATION, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert tokens == [
        "<|user|>", "hello", "there", "<|end|>", "<|assistant|>", "hi", "friend", "<|end|>",
        "<|user|>", "how", "are", "you", "<|end|>", "<|assistant|>", "fine", "thanks", "<|end|>",
    ]  # fmt: skip
    assert row["loss_mask"] == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_generation_marker_template_gives_same_mask():
    prefix_row = tokenize_conversation(CONVERSATION, make_chat_tokenizer())
    marker_row = tokenize_conversation(CONVERSATION, make_chat_tokenizer(CHAT_TEMPLATE_WITH_GENERATION))
    assert marker_row["input_ids"] == prefix_row["input_ids"]
    assert marker_row["loss_mask"] == prefix_row["loss_mask"]


def test_sharegpt_matches_messages_format(tmp_path):
    sharegpt = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi friend"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": sharegpt}) + "\n")
    data_format, examples = read_examples(load_raw_dataset(path))
    assert data_format == "sharegpt"
    assert examples == [CONVERSATION[:2]]


def test_no_assistant_turns_raises():
    tokenizer = make_chat_tokenizer()
    conversations = [[{"role": "user", "content": "hello there"}], [{"role": "system", "content": "be brief"}]]
    with pytest.raises(ValueError, match="None of the 2 conversations has an assistant turn"):
        tokenize_examples(conversations, "messages", tokenizer, max_length=64)


def test_missing_chat_template_raises():
    tokenizer = make_chat_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_conversation(CONVERSATION, tokenizer)


@pytest.mark.parametrize("overflow, expected_rows", [("truncate", 2), ("drop", 1)])
def test_long_conversation_overflow(overflow, expected_rows):
    tokenizer = make_chat_tokenizer()
    conversations = [CONVERSATION[:2], CONVERSATION]  # 8 and 17 tokens
    dataset = tokenize_examples(conversations, "messages", tokenizer, max_length=10, overflow=overflow)
    assert len(dataset) == expected_rows
    assert max(len(ids) for ids in dataset["input_ids"]) <= 10


def test_long_conversation_error_names_length():
    tokenizer = make_chat_tokenizer()
    with pytest.raises(ValueError, match="Conversation 0 is 17 tokens long, longer than max_length=10"):
        tokenize_examples([CONVERSATION], "messages", tokenizer, max_length=10, overflow="error")


def test_max_length_beyond_target_context_raises():
    with pytest.raises(ValueError, match="max_length=4096 is longer than the target's context"):
        check_max_length(4096, 2048)
    assert check_max_length(None, 2048) == 2048


def test_plain_text_is_chunked_and_fully_trained():
    tokenizer = make_chat_tokenizer()
    text = " ".join(WORDS)  # 21 words
    chunks = tokenize_text(text, tokenizer, max_length=8)
    assert [len(chunk["input_ids"]) for chunk in chunks] == [8, 8, 5]
    assert all(all(chunk["loss_mask"]) for chunk in chunks)


def test_system_prompt_augmentation_is_seeded():
    conversations = [list(CONVERSATION) for _ in range(50)]
    first = augment_system_prompts(conversations, ["be brief", "be kind"], probability=0.5, seed=3)
    second = augment_system_prompts(conversations, ["be brief", "be kind"], probability=0.5, seed=3)
    assert first == second
    num_augmented = sum(messages[0]["role"] == "system" for messages in first)
    assert 10 < num_augmented < 40
    assert all(messages[0]["content"] in ("be brief", "be kind") for messages in first if messages[0]["role"] == "system")
    assert conversations[0][0]["role"] == "user"  # the input is not modified


# ----- loading ----------------------------------------------------------------------------------


def test_load_jsonl_parquet_text_and_directory(tmp_path):
    rows = [{"text": "hello there"}, {"text": "hi friend"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    load_raw_dataset(tmp_path / "data.jsonl").to_parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("hello there\nhi friend\n")

    assert load_raw_dataset(tmp_path / "data.jsonl")["text"] == ["hello there", "hi friend"]
    assert load_raw_dataset(tmp_path / "data.parquet")["text"] == ["hello there", "hi friend"]
    assert load_raw_dataset(tmp_path / "plain")["text"] == ["hello there", "hi friend"]


def test_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_raw_dataset(tmp_path / "absent.jsonl")


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_raw_dataset(path)


def test_unreadable_file_raises(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"text": "unterminated')
    with pytest.raises(ValueError, match="Could not read data file .*broken.json"):
        load_raw_dataset(path)


def test_unknown_columns_raise(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"question": "what"}) + "\n")
    with pytest.raises(ValueError, match=r"columns \['question'\]"):
        read_examples(load_raw_dataset(path))


# ----- regeneration -----------------------------------------------------------------------------


def test_chat_regeneration_batched_equals_unbatched():
    tokenizer = make_chat_tokenizer()
    target = make_target_for(tokenizer)
    conversations = [CONVERSATION, CONVERSATION[:2], [{"role": "user", "content": "what is the time"}] + CONVERSATION[1:2]]
    batched = regenerate_chat_responses(conversations, target, tokenizer, batch_size=3, max_new_tokens=5)
    single = regenerate_chat_responses(conversations, target, tokenizer, batch_size=1, max_new_tokens=5)
    assert batched == single
    assert [message["role"] for message in batched[0]] == ["user", "assistant", "user", "assistant"]
    assert batched[0][0] == CONVERSATION[0]
    assert batched[0][2] == CONVERSATION[2]


def test_text_regeneration_keeps_prompt_and_batches():
    tokenizer = make_chat_tokenizer()
    target = make_target_for(tokenizer)
    texts = ["hello there how are you", "def return code", "what is the time now be brief"]
    batched = regenerate_text(texts, target, tokenizer, prompt_tokens=3, batch_size=3, max_new_tokens=4)
    single = regenerate_text(texts, target, tokenizer, prompt_tokens=3, batch_size=1, max_new_tokens=4)
    assert batched == single
    for text, row in zip(texts, batched):
        assert row["input_ids"][:3] == tokenizer(text)["input_ids"][:3]
        assert 3 < len(row["input_ids"]) <= 7


# ----- vocabulary and batching ------------------------------------------------------------------


def test_draft_vocab_top_n_tie_order():
    counts = torch.tensor([5, 0, 9, 5, 1, 5])
    assert select_draft_vocab(counts, 3).tolist() == [0, 2, 3]
    # Fewer seen tokens than requested: filled with unseen ids in increasing order.
    assert select_draft_vocab(torch.tensor([0, 3, 0, 0]), 2).tolist() == [0, 1]


def test_vocab_counts_loss_tokens_only():
    examples = [{"input_ids": [1, 1, 2, 3], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [3, 4], "loss_mask": [1, 1]}]
    counts = count_token_frequencies(examples, vocab_size=6, show_progress=False)
    assert counts.tolist() == [0, 0, 1, 2, 1, 0]
    assert build_draft_vocab(examples, 6, 2, show_progress=False).tolist() == [2, 3]


def test_vocab_rejects_foreign_token_ids():
    with pytest.raises(ValueError, match="outside the target vocabulary of size 4"):
        count_token_frequencies([{"input_ids": [1, 7]}], vocab_size=4, show_progress=False)


def test_collator_pads_on_the_right():
    collator = EdsdDataCollator(pad_token_id=9)
    batch = collator(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "loss_mask": [0, 1, 1]},
            {"input_ids": [4], "attention_mask": [1], "loss_mask": [1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
