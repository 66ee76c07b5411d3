"""The package's layering: each layer imports only the ones below it, and no module grows into a god file."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ssae_kernels"
OP_LAYER = ["ops", "triton", "backends.py", "reference.py", "info.py", "distributed.py"]
TRAINING_LAYER = ["sae.py", "trainer.py", "data_parallel.py", "activations.py", "evaluate.py", "formats.py",
                  "storage.py", "memory.py",
                  "models.py", "text.py", "retrieval.py"]
ABOVE_OPS = {m.removesuffix(".py") for m in TRAINING_LAYER} | {"recipes", "cli", "data"}


def _files(entries):
    for entry in entries:
        path = PACKAGE / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imported_package_modules(path: pathlib.Path) -> set[str]:
    """First component of every ssae_kernels module that ``path`` imports (absolute or relative)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # packages between ssae_kernels and the file
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "ssae_kernels":
                    continue
                parts = parts[1:]
            else:
                up = node.level - 1
                if up > depth:
                    continue
                here = list(path.relative_to(PACKAGE).parts[:-1])
                parts = here[:len(here) - up] + (node.module.split(".") if node.module else [])
            names = parts[:1] if parts else [alias.name for alias in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ssae_kernels."))
    return found


@pytest.mark.parametrize("path", list(_files(OP_LAYER)), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_op_layer_imports_nothing_above_it(path):
    assert not _imported_package_modules(path) & ABOVE_OPS


@pytest.mark.parametrize("path", list(_files(TRAINING_LAYER)), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_training_layer_imports_no_recipe(path):
    assert not _imported_package_modules(path) & {"recipes", "cli"}


def test_no_module_is_a_god_file():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_the_checker_sees_relative_imports(tmp_path):
    assert "recipes" in _imported_package_modules(PACKAGE / "cli.py")
    assert "ops" in _imported_package_modules(PACKAGE / "sae.py")


def test_example_scripts_stay_thin():
    scripts = PACKAGE.parent / "python"
    sizes = {p.name: len(p.read_text().splitlines()) for p in scripts.glob("*.py")}
    assert sizes and {name: n for name, n in sizes.items() if n > 30} == {}


def test_every_pipeline_registers_its_subcommands():
    import argparse
    import importlib

    from ssae_kernels.recipes import PIPELINES

    for name in PIPELINES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"ssae_kernels.recipes.{name}").add_subcommands(sub)
        assert sub.choices, name
        for command, parser in sub.choices.items():
            assert callable(parser.get_default("handler")), (name, command)
