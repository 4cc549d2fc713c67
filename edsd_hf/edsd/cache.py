"""Key/value cache of the EDSD draft.

The draft keeps its own small cache instead of a transformers `Cache`: it needs only append,
length and crop-to-length, and owning those three operations keeps the draft independent of the
cache API, which changes between transformers minor releases.
"""

import torch


class EdsdDraftCache:
    """Per-layer keys and values of the draft, shape `[batch, num_kv_heads, seq_len, head_dim]`.

    By default every append concatenates, which autograd needs during training. With `capacity`
    the cache writes into preallocated buffers of that many positions (doubled when full) and
    returns views of the filled part. Drafting uses that mode: concatenation copies the whole cache
    for every drafted token, a cost that grows with the sequence and is a visible share of a
    one-token draft step on CPU. In that mode `key_cache` and `value_cache` contain the whole
    buffers, so read the filled part from `update`'s return value or up to `get_seq_length()`.
    """

    def __init__(self, num_layers: int, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of positions or None, got {capacity}.")
        self.capacity = capacity
        self.key_cache: list[torch.Tensor | None] = [None] * num_layers
        self.value_cache: list[torch.Tensor | None] = [None] * num_layers
        # Filled positions per layer (only used with preallocated buffers).
        self._lengths = [0] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Append new keys and values for `layer_idx` and return everything cached for that layer."""
        if self.capacity is None:
            return self._concatenate(key_states, value_states, layer_idx)

        start = self._lengths[layer_idx]
        end = start + key_states.shape[-2]
        buffer = self.key_cache[layer_idx]
        if buffer is None or buffer.shape[-2] < end:
            self._grow(layer_idx, key_states, value_states, end)
        self.key_cache[layer_idx][..., start:end, :] = key_states
        self.value_cache[layer_idx][..., start:end, :] = value_states
        self._lengths[layer_idx] = end
        return self.key_cache[layer_idx][..., :end, :], self.value_cache[layer_idx][..., :end, :]

    def _grow(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        old_keys, old_values = self.key_cache[layer_idx], self.value_cache[layer_idx]
        size = self.capacity if old_keys is None else 2 * old_keys.shape[-2]
        size = max(size, needed)
        batch, heads, _, head_dim = key_states.shape
        self.key_cache[layer_idx] = key_states.new_empty((batch, heads, size, head_dim))
        self.value_cache[layer_idx] = value_states.new_empty((batch, heads, size, head_dim))
        filled = self._lengths[layer_idx]
        if old_keys is not None and filled > 0:
            self.key_cache[layer_idx][..., :filled, :] = old_keys[..., :filled, :]
            self.value_cache[layer_idx][..., :filled, :] = old_values[..., :filled, :]

    def _concatenate(self, key_states, value_states, layer_idx):
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx] = key_states
            self.value_cache[layer_idx] = value_states
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.capacity is not None:
            return self._lengths[layer_idx]
        keys = self.key_cache[layer_idx]
        return 0 if keys is None else keys.shape[-2]

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions of every layer, dropping the rest."""
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}.")
        if self.capacity is not None:
            self._lengths = [min(length, max_length) for length in self._lengths]
            return
        for layer_idx, keys in enumerate(self.key_cache):
            if keys is not None and keys.shape[-2] > max_length:
                self.key_cache[layer_idx] = keys[..., :max_length, :]
                self.value_cache[layer_idx] = self.value_cache[layer_idx][..., :max_length, :]
