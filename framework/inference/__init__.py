"""Using a trained model: loading it for inference, the sampler (``llada generate``), the Monte
Carlo likelihood (``llada eval``) and the lm-evaluation-harness model ``llada``."""
