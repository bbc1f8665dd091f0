"""Structured output (JSON schema, regex, choice, EBNF grammar, tool calls) enforced per token.

params.py           what a request must match (vLLM's StructuredOutputsParams)
compiler.py         xgrammar compilation, cached by the spec's hash, never on the step thread
request_grammar.py  the scheduler-side matcher of one request; fills the next position's bitmask
bitmask.py          the executor applies the batch's bitmasks to the logits in one op
"""
from engine_core.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
