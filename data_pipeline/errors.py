"""The errors the data pipeline raises. Both carry one line that names the problem (the config
key, file, shard or dataset), so a command line can print it as it is."""


class DataConfigError(ValueError):
    """Bad data input or a bad data setting: a key, a file, a manifest, a tokenizer, a loader
    state that does not fit. The run must not start (``llada`` exits 2)."""


class DataError(RuntimeError):
    """No readable sample at all in a reader's shards: the run cannot be fed. Names the dataset."""
