"""Named architectures: the registry, vision encoders, the one decoder-only Transformer, attention, routing, tokenizers."""
