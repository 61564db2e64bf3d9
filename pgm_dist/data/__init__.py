"""Data: sentencepiece tokenizer, WebDataset shard builder, streaming loaders."""
