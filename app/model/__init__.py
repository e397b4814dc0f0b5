"""Everything that touches tensors: the LLaMA model, paged attention, KV cache, sampler."""
