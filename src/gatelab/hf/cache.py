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
