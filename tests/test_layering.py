"""Module boundaries: the product never imports the harness (benchmarks, demo, model folders,
synthetic workloads, tests); the pure cores import neither vLLM nor torch."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_prepack"
HARNESS = ("vllm_prepack.bench", "vllm_prepack.models", "vllm_prepack.workloads", "tests", "conftest")
# the CLI dispatches to the harness's commands (demo, bench): the one exception, by design
PRODUCT = sorted(p for p in [*PACKAGE.glob("*.py"), *(ROOT / "patches").glob("*.py")]
                 if p.name not in ("cli.py", "models.py", "workloads.py"))
PURE = ["policy.py", "packing.py", "argtypes.py", "dispatch.py", "layout.py", "config.py",
        "batch_record.py", "batch_input.py", "batch_output.py", "errors.py"]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: p.name)
def test_the_product_never_imports_the_harness(path):
    bad = sorted(m for m in imports(path) if m.startswith(HARNESS))
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", PURE)
def test_pure_cores_import_neither_vllm_nor_torch(name):
    bad = sorted(m for m in imports(PACKAGE / name)
                 if m.split(".")[0] in ("vllm", "torch", "transformers", "ray"))
    assert not bad, f"{name} imports {bad}"
