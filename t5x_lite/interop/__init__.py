"""Checkpoint interop with other ecosystems (Hugging Face transformers: `hf`)."""
