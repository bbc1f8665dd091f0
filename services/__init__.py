"""Thin gRPC services around engine_core (DESIGN.md §1): executor, tokenizer, scheduler."""
