"""The package reads one way: imports follow the layers, no module imports another that
(directly or not) imports it back, the Shapes world is reached only through its package, and
every module imports on its own. The graph is read from the source with ``ast`` (imports
inside functions count; ``if TYPE_CHECKING:`` blocks do not)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsas_diffusion"
ROOT_NAME = "dsas_diffusion"

#: top-level part of the package -> the parts its modules may import (besides themselves)
ALLOWED = {
    "names": set(),
    "errors": set(),
    "_extras": set(),
    "config": {"names", "errors"},
    "_lazy": set(),
    "steering": {"_extras", "names", "errors", "config"},
    "prompts": {"errors"},  # the floor, below the core: it reaches nothing above it
    "shapes": {"names", "errors", "config", "_lazy", "steering", "prompts"},
    "diffusion": {"_extras", "names", "errors", "config", "steering", "prompts", "shapes"},
    "text": {"_extras", "names", "errors", "config", "steering", "prompts", "shapes"},
    "vllm": {"steering"},  # the core only: it runs in vLLM's environment, beside another transformers
    "eval": {"_extras", "names", "errors", "config", "_lazy", "steering", "prompts", "shapes", "diffusion", "text"},
    "app": {
        "_extras",
        "names",
        "errors",
        "config",
        "_lazy",
        "steering",
        "prompts",
        "shapes",
        "diffusion",
        "text",
        "eval",
    },
    "demo": {"names", "errors", "config", "steering", "prompts", "shapes", "diffusion", "eval"},
    "cli": {"names", "errors", "config", "steering", "prompts", "shapes", "diffusion", "text", "eval", "app"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def _is_module(name: str) -> bool:
    return _is_package(name) or (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    return skipped


def _imports(path: Path) -> set[str]:
    """The dsas_diffusion modules ``path`` imports (packages resolve to their ``__init__``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == ROOT_NAME}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != ROOT_NAME:
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if _is_module(candidate) else source)
    return {module for module in found if module != name}


GRAPH = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_every_module_and_the_known_edges():
    assert len(GRAPH) > 40
    assert "dsas_diffusion.steering.persistence" in GRAPH["dsas_diffusion.steering.steerer"]
    assert "dsas_diffusion.diffusion.loading" in GRAPH["dsas_diffusion.cli"]  # imported inside a function


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        path.pop()
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module)


def test_imports_follow_the_layers():
    wrong = []
    for module, targets in GRAPH.items():
        if _is_package(module):
            continue  # a package's __init__ re-exports names; its re-exports do not count
        part = _part(module)
        for target in targets:
            target_part = _part(target)
            if target_part in ("", part):
                continue
            if target_part not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_library_reaches_the_shapes_world_only_through_its_package():
    reaching_in = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _part(module) != "shapes"
        for target in targets
        if _part(target) == "shapes" and target != f"{ROOT_NAME}.shapes"
    ]
    assert not reaching_in, "\n".join(reaching_in)


FUNCTION_LINES = 80


def test_functions_stay_short_and_nothing_is_folded_to_fit():
    """Size by function, not by file: no function in the package over 80 lines (docstring
    included; builders and kernels too, split by step), and no ``fmt: skip`` folding code to
    pass the rule."""
    long, folded = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        name = path.relative_to(PACKAGE)
        folded += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if "fmt: skip" in line]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (lines := node.end_lineno - node.lineno + 1) > FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not long, long
    assert not folded, folded


def test_every_module_imports_and_the_command_line_loads_nothing_heavy():
    modules = sorted(m for m in GRAPH if not m.endswith("__main__"))  # those run a command
    code = (
        "import importlib, sys\n"
        "from dsas_diffusion.cli import build_parser\n"
        "build_parser().parse_args(['demo', '--port', '1'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'gradio', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'building the CLI parser loaded {heavy}'\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("imported")
