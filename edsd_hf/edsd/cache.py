"""Key/value cache of the EDSD draft.

The draft keeps its own small cache instead of a transformers `Cache`: it needs only append,
length and crop-to-length, and owning those three operations keeps the draft independent of the
cache API, which changes between transformers minor releases.
"""

import torch


class EdsdDraftCache:
    """Per-layer keys and values of the draft, shape `[batch, num_kv_heads, seq_len, head_dim]`."""

    def __init__(self, num_layers: int):
        self.key_cache: list[torch.Tensor | None] = [None] * num_layers
        self.value_cache: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Append new keys and values for `layer_idx` and return everything cached for that layer."""
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx] = key_states
            self.value_cache[layer_idx] = value_states
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.key_cache[layer_idx]
        return 0 if keys is None else keys.shape[-2]

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions of every layer, dropping the rest."""
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}.")
        for layer_idx, keys in enumerate(self.key_cache):
            if keys is not None and keys.shape[-2] > max_length:
                self.key_cache[layer_idx] = keys[..., :max_length, :]
                self.value_cache[layer_idx] = self.value_cache[layer_idx][..., :max_length, :]
