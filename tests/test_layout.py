"""The package's layering (README "Layout"): imports run one way, so each folder can be read alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "video", "vllm_ext", "research", "apps")
"""Each layer may import the ones before it; intp_vllm/machine.py is a leaf anyone may import."""
PRODUCT = ("core", "video", "vllm_ext", "apps/serve.py", "apps/flags.py", "apps/batch")
"""What serving and batch run: never the research tooling."""


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def files(part: str) -> list[Path]:
    path = ROOT / "intp_vllm" / part
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_before_it(layer):
    later = LAYERS[LAYERS.index(layer) + 1:]
    for path in files(layer):
        for name in imports_of(path):
            assert not any(name.startswith(f"intp_vllm.{other}") for other in later), (path, name)
            if layer in ("core", "video"):
                assert name.split(".")[0] != "vllm", (path, name)
            assert not name.startswith("intp_vllm_benchmarks"), (path, name)


def test_product_never_imports_research_tooling():
    for part in PRODUCT:
        for path in files(part):
            assert not any(name.startswith("intp_vllm.research") for name in imports_of(path)), path


def test_kernels_import_nothing_from_the_package():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        assert not any(name.split(".")[0] == "intp_vllm" for name in imports_of(path)), path


def test_the_kernel_computes_every_per_token_rope_type():
    """The kernel's own table (it cannot import the package) names the rotary's types, in order."""
    from intp_vllm.vllm_ext.rotary import ROTARY_TYPES
    from intp_vllm_kernels.scaled_rotary import ROPE_TYPES as KERNEL_TYPES

    assert tuple(KERNEL_TYPES) == ROTARY_TYPES
