"""The tokenizer gRPC service: encode, chat templates, decode, incremental detokenization."""
