"""The generation runtime: engine loading, backends (NumPy reference, PyCUDA), KV cache, sampler, tokenizer."""
