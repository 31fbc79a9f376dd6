"""Instruction data: input formats, the built-in set, tokenizers, the prompt template, prepared token shards."""
