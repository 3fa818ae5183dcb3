"""LLaDA pretraining: the config (config/) and the subpackages model, parallel, training,
checkpoint, tracking and launch (README, "Layout": what each holds, which way imports run).

Importing the package silences the known, harmless noise of the libraries under it, at its
source (quiet.py), so that the first screen a user sees is ours.
"""

from framework.quiet import quiet_libraries

quiet_libraries()
