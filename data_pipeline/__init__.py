"""The data pipeline, a package of its own (it never imports the framework): its configs
(config.py) and errors (errors.py), corpus readers, the tokenizer, ``llada prepare``, the shard
format, the streaming loader, LLaDA's forward process and its noise (noise.py), the collators and
SFT data."""
