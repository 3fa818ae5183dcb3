"""Using a trained model: loading it for inference (``model.py``), the sampler (``sampler.py``,
``llada generate``) and the Monte Carlo conditional likelihood (``likelihood.py``, which ``llada
eval`` and the harness model of framework/evaluation/harness.py score with)."""
