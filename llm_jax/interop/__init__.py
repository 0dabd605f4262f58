"""Weights in and out of other ecosystems: `hf` converts to and from Hugging Face transformers."""
