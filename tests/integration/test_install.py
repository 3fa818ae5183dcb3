"""A plain (non-editable) install works without the source checkout: ``llada slurm submit
--dry-run`` renders the sbatch script, which ships as package data. The project is installed
with ``--no-deps`` into a target directory over the test environment (its dependencies are
already there), from a copy of the sources, and run from elsewhere."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DEBUG_RECIPE, REPO

pytestmark = pytest.mark.slow

SOURCES = ("pyproject.toml", "README.md", "framework", "data_pipeline", "llada_kernels")


def test_slurm_submit_after_a_plain_install(tmp_path):
    src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (target / "framework" / "launch" / "llada.sbatch").is_file()
    shutil.rmtree(src)  # nothing of a checkout is left to lean on
    elsewhere.mkdir()
    recipe = elsewhere / "recipe.yaml"
    shutil.copyfile(DEBUG_RECIPE, recipe)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import framework; print(framework.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    proc = subprocess.run([str(target / "bin" / "llada"), "slurm", "submit", str(recipe),
                           "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
                           "--time", "1:00:00", "--dry-run"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --ntasks-per-node=1" in proc.stdout
    assert f"set -- {recipe}" in proc.stdout and "-m framework train" in proc.stdout
