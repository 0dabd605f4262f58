"""Text to training batches: tokenizers (`tokenizer`), document sources (`sources`) and the
packing, sharding, resumable batch pipeline (`pipeline`). See docs/data.md."""
