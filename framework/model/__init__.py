"""The LLaDA model: the parameter table (params.py), the layer spec and core attention, the
pieces and their assembly in one process or as pipeline stages, and layout-independent
weights."""
