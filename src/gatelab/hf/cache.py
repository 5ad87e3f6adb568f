"""A key/value cache for generation that appends in place.

transformers' DynamicCache concatenates each step's keys and values onto the whole cache, which copies the cache at
every step and every layer: at long contexts that copy costs more than reading the cache for attention. `kv_cache`
builds the same cache whose full-attention layers keep their keys and values in buffers with room to grow
(`append_in_place`), sized for the prompt and the new tokens when given, and hand attention a view of the filled
part. Sliding-window layers keep transformers' own layer.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from gatelab.attention.block_decode import append_in_place
from gatelab.attention.fixed_decode import FixedDecode
from gatelab.config import GatelabError


class InPlaceLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers that grow by a quarter when full."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self._views_buffer():  # first call, or the cache was reordered or cropped onto new tensors
            self.key_buffer, self.value_buffer = self.keys, self.values
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        self.key_buffer = append_in_place(self.key_buffer if n else None, key_states, 2, n, self.capacity)
        self.value_buffer = append_in_place(self.value_buffer if n else None, value_states, 2, n, self.capacity)
        end = n + key_states.shape[-2]
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _views_buffer(self) -> bool:
        buf = self.key_buffer
        return (buf is not None and self.keys.dim() == 4 and self.keys.data_ptr() == buf.data_ptr()
                and self.keys.shape[:2] == buf.shape[:2] and self.values.data_ptr() == self.value_buffer.data_ptr())


class FixedLayer(DynamicLayer):
    """Keys and values in buffers of fixed.capacity positions, allocated at the prompt (B, capacity, Hk, D). The prompt
    fills the first positions and gets views of the filled part; a decoding step (fixed.stepping) writes its one
    position at fixed.position on the device and gets views of the whole buffers (attention masks the rest), so the
    same step serves every position and can be replayed from a CUDA graph."""

    def __init__(self, fixed: FixedDecode):
        super().__init__()
        self.fixed, self.filled = fixed, 0
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hk, T, D = key_states.shape
        if self.key_buffer is None:
            self.key_buffer = key_states.new_zeros(B, self.fixed.capacity, Hk, D)
            self.value_buffer = value_states.new_zeros(B, self.fixed.capacity, Hk, value_states.shape[-1])
        keys, values = self.key_buffer.transpose(1, 2), self.value_buffer.transpose(1, 2)
        if self.fixed.stepping:
            self.key_buffer.index_copy_(1, self.fixed.position, key_states.transpose(1, 2))
            self.value_buffer.index_copy_(1, self.fixed.position, value_states.transpose(1, 2))
            return keys, values
        end = self.filled + T
        if end > self.fixed.capacity:
            raise GatelabError(f"the cache holds {self.fixed.capacity} positions; this call needs {end}")
        keys[:, :, self.filled:end], values[:, :, self.filled:end] = key_states, value_states
        self.filled = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def fixed_kv_cache(model, fixed: FixedDecode) -> DynamicCache:
    """A cache for `model` whose layers are FixedLayer (fixed.capacity positions); every layer must be a full-attention
    layer (sliding-window layers keep a window, not a fixed cache)."""
    cache = kv_cache(model)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not InPlaceLayer for layer in layers):
        raise GatelabError("decoding with CUDA graphs needs a model whose layers all attend to the whole sequence "
                           "(no sliding-window layers) and a transformers with per-layer caches")
    cache.layers = [FixedLayer(fixed) for _ in layers]
    return cache


def kv_cache(model, capacity: int = 0) -> DynamicCache:
    """A DynamicCache for `model` whose full-attention layers append in place (InPlaceLayer), with room for
    `capacity` positions from the start (0: grown as needed)."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers whose caches take no config
        cache = DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [InPlaceLayer(capacity) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


def cache_keyword(model) -> str:
    """The name the model's forward (and generate) takes a cache by: `cache` in newer transformers, else
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
