"""DESIGN.md's rule, kept by construction: imports point down the layers only."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lower index = lower layer. A module may import only its own layer or those below it.
LAYERS = ["server.kernels", "server.layers", "server.models", "server.runtime", "server.engine",
          "server.api"]
TOP = {"server.llm", "server.__main__", "server"}  # may import anything
SHARED = {"server.config", "server.sampling_params", "server.outputs", "server.version"}  # plain data, no imports up


def layer_of(module: str) -> int | None:
    for index, prefix in reversed(list(enumerate(LAYERS))):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "server"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for path in (ROOT / "server").rglob("*.py"):
        module = module_name(path)
        if module in TOP:
            continue
        own = layer_of(module)
        for imported in imports_of(path):
            if module in SHARED:
                if imported not in SHARED:
                    violations.append(f"{module} -> {imported}")
                continue
            target = layer_of(imported)
            if own is not None and target is not None and target > own:
                violations.append(f"{module} -> {imported}")
            if imported in TOP:
                violations.append(f"{module} -> {imported}")
    assert violations == []


def test_the_layers_exist():
    for prefix in LAYERS[:-1]:
        assert (ROOT / prefix.replace(".", "/")).is_dir(), prefix


def test_the_http_layer_never_touches_tensors():
    for path in (ROOT / "server" / "api").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {n for n in names if n.split(".")[0] in ("torch", "triton")}, path
