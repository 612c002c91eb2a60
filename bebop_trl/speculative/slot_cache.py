"""A KV cache that keeps one sequence per row from slot 0, written at per-row positions.

The engine's rows advance by different amounts each cycle (each keeps its accepted drafts) and are refilled with new
completions when they finish. A `DynamicCache` appends the same number of slots to every row, so rejected slots
would stay behind, masked, and a refilled row would inherit the width of the batch. Here every row holds its own
sequence contiguously from slot 0 up to its length: a forward writes each row's new slots right after its own length,
[`commit`][bebop_trl.speculative.slot_cache.SlotCache.commit] keeps only the slots a row accepted, and the next
forward overwrites the rest. The attention mask is built from the lengths ([`open`][bebop_trl.speculative.slot_cache.SlotCache.open]):
slot j of row b is visible to the row's i-th new token when j <= its own slot, so every forward attends exactly to
the row's sequence.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, [B, heads, capacity, head_dim], written at the cache's positions."""

    is_sliding = False

    def __init__(self, cache: "SlotCache"):
        super().__init__()
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch_size, heads, _, _ = key_states.shape
        shape = (batch_size, heads, self._cache.capacity)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self._cache.write_positions
        for buffer, states in ((self.keys, key_states), (self.values, value_states)):
            index = positions[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
            buffer.scatter_(2, index, states.to(buffer.dtype))
        width = self._cache.width
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.width, 0

    def get_seq_length(self) -> int:
        return int(self._cache.lengths.max()) if self._cache.lengths.numel() else 0

    def get_max_length(self) -> int:
        return -1

    def grow(self, capacity: int) -> None:
        """Reallocates the buffers to hold `capacity` slots per row, keeping what they hold."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def select(self, rows: torch.LongTensor) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]


class SlotCache(Cache):
    """KV cache of a batch whose rows each hold one sequence from slot 0, up to their own length.

    A forward over `n` new tokens per row goes: `mask = cache.open(n)` (the new tokens take the slots after each
    row's length and whatever it wrote since its last commit), the model's forward with `attention_mask=mask` and the
    cache, then either more `open`/forward rounds or [`commit`][bebop_trl.speculative.slot_cache.SlotCache.commit]
    with the number of written slots each row keeps. Slot j of a row holds the token at position j, so a row's
    next position is its length.

    Args:
        num_layers: Attention layers of the model the cache is for.
        batch_size: Rows.
        capacity: Slots per row to allocate at first; the buffers grow when a row needs more.
        device: Device of the lengths (the buffers take the device of the first keys written).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, device: torch.device | str):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.capacity = capacity
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.write_positions: torch.LongTensor | None = None
        self.width = 0
        # Slots written after `lengths` by the forwards since the last commit.
        self._written = 0

    def open(self, num_tokens: int) -> torch.Tensor:
        """Prepares a forward over `num_tokens` new tokens per row and returns its attention mask.

        Returns:
            [B, 1, num_tokens, width] bool mask: new token i of row b sees the row's slots up to its own.
        """
        positions = (self.lengths + self._written).unsqueeze(-1) + torch.arange(num_tokens, device=self.lengths.device)
        self._written += num_tokens
        self.width = int(positions[:, -1].max()) + 1
        if self.width > self.capacity:
            self.capacity = max(self.width, 2 * self.capacity)
            for layer in self.layers:
                if layer.is_initialized:
                    layer.grow(self.capacity)
        self.write_positions = positions
        slots = torch.arange(self.width, device=positions.device)
        return (slots <= positions.unsqueeze(-1)).unsqueeze(1)

    def positions(self, num_tokens: int, offset: int = 0) -> torch.LongTensor:
        """[B, num_tokens] positions of the next `num_tokens` slots after each row's length and `offset` more."""
        return (self.lengths + offset).unsqueeze(-1) + torch.arange(num_tokens, device=self.lengths.device)

    def commit(self, kept: torch.LongTensor) -> None:
        """Keeps the first `kept[b]` slots row b wrote since the last commit; the rest are dropped."""
        self.lengths = self.lengths + kept
        self._written = 0

    def discard(self) -> None:
        """Drops every slot written since the last commit."""
        self._written = 0

    def select(self, rows: torch.LongTensor) -> None:
        """Keeps only the rows at indices `rows`, in that order."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.select(rows)
        self.lengths = self.lengths[rows]

    def load(
        self,
        rows: torch.LongTensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        lengths: torch.LongTensor,
    ) -> None:
        """Replaces rows `rows` by new sequences: per layer, `keys[l]` / `values[l]` [n, heads, L, head_dim] hold the
        n sequences from slot 0 (slots past `lengths[i]` are ignored)."""
        width = keys[0].shape[2]
        if width > self.capacity:
            self.capacity = max(width, 2 * self.capacity)
            for layer in self.layers:
                if layer.is_initialized:
                    layer.grow(self.capacity)
        batch_size = len(self.lengths)
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            if not layer.is_initialized:
                shape = (batch_size, *layer_keys.shape[1:2], 0, layer_keys.shape[-1])
                layer.lazy_initialization(layer_keys.new_empty(shape), layer_values.new_empty(shape))
            layer.keys[rows, :, :width] = layer_keys.to(layer.keys.dtype)
            layer.values[rows, :, :width] = layer_values.to(layer.values.dtype)
        self.lengths = self.lengths.clone()
        self.lengths[rows] = lengths

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0


def strip_left_padding(states: torch.Tensor, lengths: torch.LongTensor) -> torch.Tensor:
    """[n, heads, W, d] left-padded per-row states -> [n, heads, max(lengths), d], each row's last `lengths[i]` slots
    moved to slot 0 (what follows them in a row is left over)."""
    width = states.shape[2]
    longest = int(lengths.max())
    index = (width - lengths).unsqueeze(-1) + torch.arange(longest, device=states.device)
    index = index.clamp(max=width - 1)[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
    return states.gather(2, index)
