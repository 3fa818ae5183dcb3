"""Starting work: the command line (cli.py), Slurm jobs (slurm.py and the sbatch script
llada.sbatch, package data) and sizing a layout before launching it (plan.py)."""
