"""Packages import one way (README, "Layout"): ``framework`` may use ``data_pipeline`` and
``llada_kernels``, never the reverse; inside ``framework`` each subpackage uses only those below it.
Every module's imports are read with ast (nothing is imported), relative ones resolved."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# what each part may import of ours (a part always may import itself)
ALLOWED = {
    "llada_kernels": set(),
    "data_pipeline": set(),
    "framework.hf_config": set(),  # config.json of Hugging Face models: plain data
    "framework.config": {"data_pipeline", "framework.hf_config"},
    "framework.quiet": set(),
    "framework.parallel": {"framework.config"},
    "framework.model": {"framework.config", "framework.parallel", "llada_kernels"},
    "framework.tracking": {"data_pipeline", "framework.config", "framework.parallel"},
    "framework.checkpoint": {"data_pipeline", "framework.hf_config", "framework.config",
                             "framework.parallel", "framework.model"},
    "framework.inference": {"data_pipeline", "framework.hf_config", "framework.config",
                            "framework.parallel", "framework.model", "framework.checkpoint"},
    "framework.evaluation": {"data_pipeline", "framework.hf_config", "framework.config",
                             "framework.parallel", "framework.model", "framework.checkpoint",
                             "framework.inference"},
    "framework.training": {"data_pipeline", "framework.hf_config", "llada_kernels",
                           "framework.config", "framework.parallel", "framework.model",
                           "framework.checkpoint", "framework.tracking", "framework.evaluation"},
    "framework.launch": {"data_pipeline", "framework.hf_config", "llada_kernels",
                         "framework.config", "framework.parallel", "framework.model",
                         "framework.checkpoint", "framework.tracking", "framework.training",
                         "framework.evaluation", "framework.inference"},
    "framework": {"framework.quiet", "framework.launch"},  # the package and its __main__
}
OURS = ("framework", "data_pipeline", "llada_kernels")


def part_of(module: str) -> str:
    """The longest ALLOWED key that names the module or a package above it."""
    return max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool) -> set:
    """The modules of ours that the source imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module
                base = module.split(".")[:len(module.split(".")) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
    return {name for name in found if name.split(".")[0] in OURS}


def violations(source: str, module: str, is_package: bool = False) -> list:
    mine = part_of(module)
    out = []
    for name in sorted(imported(source, module, is_package)):
        theirs = part_of(name)
        if theirs != mine and theirs not in ALLOWED[mine]:
            out.append(f"{module} imports {name}")
    return out


def our_modules():
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path


@pytest.mark.parametrize("path", list(our_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_run_one_way(path):
    module = module_name(path)
    assert violations(path.read_text(), module, path.name == "__init__.py") == []


def test_one_reverse_import_is_caught():
    # the checker itself: a data_pipeline module importing framework fails, lazily or not
    assert violations("def f():\n    from framework.config import ConfigError\n",
                      "data_pipeline.loader") == ["data_pipeline.loader imports framework.config"]
    assert violations("import framework.training.trainer\n", "framework.model.params") == [
        "framework.model.params imports framework.training.trainer"]
    assert violations("from . import weights\n", "framework.model.params") == []
    assert violations("from ..training import metrics\n", "framework.model.params") == [
        "framework.model.params imports framework.training"]
    assert violations("from data_pipeline.files import atomic_write\n",
                      "framework.checkpoint.checkpointer") == []


# megatron-core's global parallel state is read where the groups are made and where the model's
# layers need it; everything else gets its groups from our World (framework/parallel/world.py)
PARALLEL_STATE_READERS = ("framework.parallel", "framework.model")


def reads_parallel_state(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(
                a.name.startswith("megatron.core.parallel_state") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("megatron.core.parallel_state")
                or node.module == "megatron.core"
                and any(a.name == "parallel_state" for a in node.names)):
            return True
    return False


@pytest.mark.parametrize("path", list(our_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_world_and_the_model_read_megatrons_parallel_state(path):
    module = module_name(path)
    if module.startswith(PARALLEL_STATE_READERS):
        return
    assert not reads_parallel_state(path.read_text()), \
        f"{module} reads megatron's parallel_state: take the groups from World"


def test_a_parallel_state_import_is_caught():
    assert reads_parallel_state("from megatron.core import parallel_state\n")
    assert reads_parallel_state("def f():\n    from megatron.core import parallel_state as ps\n")
    assert reads_parallel_state("import megatron.core.parallel_state\n")
    assert reads_parallel_state("from megatron.core.parallel_state import get_data_parallel_group\n")
    assert not reads_parallel_state("from megatron.core import tensor_parallel\n")
