"""The shared decoder core: config, weights, decoders, paged KV cache, scheduler, engine."""
