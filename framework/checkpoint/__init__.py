"""Checkpoints: what a checkpoint directory holds (files.py, the one definition of the file
layout), saving, completeness and retention (checkpointer.py), resuming (resume.py), full tensors
under any layout (reshard.py), and the Hugging Face LLaDA layout (hf_mapping.py: names, shapes,
config.json; hf_files.py: export and import on disk)."""
