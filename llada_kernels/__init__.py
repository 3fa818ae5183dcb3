"""Fused kernels for the hot paths of LLaDA training, each beside a plain PyTorch reference that
the tests compare it with. The reference implementations in ``framework`` (the objective in
``framework/training/objective.py``, attention through ``scaled_dot_product_attention``) are what runs
until a kernel here is measured faster on the GPU machine."""
