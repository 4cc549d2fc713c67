"""Tiny target models and drafts built in code from real transformers configs (no downloads)."""

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from edsd_hf import EdsdConfig, EdsdDraftModel


VOCAB_SIZE = 64

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
}


def make_target(family: str = "llama", seed: int = 0, **overrides):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra, **overrides})
    return model_class(config).eval()


def make_draft(target, seed: int = 1, draft_vocab_size: int | None = None, fusion: str = "edfuse", **overrides):
    torch.manual_seed(seed)
    config = EdsdConfig.from_target_config(target.config, draft_vocab_size=draft_vocab_size, fusion=fusion, **overrides)
    return EdsdDraftModel(config).eval()


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer with one token per character of a fixed alphabet, matching VOCAB_SIZE."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
    vocab = {character: index for index, character in enumerate(alphabet[:VOCAB_SIZE])}
    model = Tokenizer(WordLevel(vocab, unk_token="a"))
    model.pre_tokenizer = Split("", behavior="isolated")
    # Fuse joins tokens without separators, so decoding gives back the original characters.
    model.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model)
    return tokenizer


def prompts(num_prompts: int, seed: int = 0, min_length: int = 3, max_length: int = 20) -> list[torch.LongTensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (num_prompts,), generator=generator)
    return [torch.randint(0, VOCAB_SIZE, (1, int(n)), generator=generator) for n in lengths]


def distill_draft(
    target, draft, num_steps: int = 150, sequence_length: int = 48, ttt_steps: int = 3, lr: float = 3e-3, seed: int = 0
):
    """Train `draft` briefly on the target's own greedy continuations, so that it accepts tokens.

    A small stand-in for the real trainer: soft cross-entropy against the target's next-token
    distribution, unrolled over `ttt_steps`.
    """
    draft.attach_target(target)
    layer_ids = [i + 1 for i in draft.config.target_layer_ids]
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    with torch.no_grad():
        for _ in range(16):
            start = torch.randint(0, VOCAB_SIZE, (1, 4), generator=generator)
            sequences.append(target.generate(start, max_new_tokens=sequence_length - 4, do_sample=False))
    data = torch.cat(sequences)

    draft.train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=lr)
    for step in range(num_steps):
        batch = data[torch.randint(0, len(data), (8,), generator=generator)]
        with torch.no_grad():
            out = target(batch, output_hidden_states=layer_ids)
            features = torch.cat([out.hidden_states[i][:, :-1] for i in layer_ids], dim=-1)
            target_probs = out.logits[:, 1:, draft.d2t].softmax(-1)
        step_logits = draft.forward_unrolled(features, input_ids=batch[:, 1:], num_steps=ttt_steps)
        loss = sum(
            0.8**i * -(target_probs * logits.log_softmax(-1)).sum(-1)[:, i:].mean() for i, logits in enumerate(step_logits)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return draft.eval()
