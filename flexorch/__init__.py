"""flexorch: score prompts with LLMs far larger than your GPU by streaming the model layer by layer."""
