"""Trident engine: model loading, paged KV cache, scheduler, model runner, sampling."""
