"""Explanations of the selected neurons: one explainer interface, an LLM backend
(`openai`) and a statistical baseline (`offline`). See `builder.explain.stage`."""
