"""Process groups and layouts: the World (torch.distributed, megatron-core's tensor/pipeline
groups, DeepSpeed's view of them: world.py) and where each piece of the model lives under a
pipeline layout (layout.py, plain arithmetic)."""
