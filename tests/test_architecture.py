"""The package's layering: no import cycle, and every module described in the package docstring."""

import ast
import re
from pathlib import Path

import resnet_jax

PACKAGE = Path(resnet_jax.__file__).parent


def _modules() -> dict[str, Path]:
    """Module name (`train`, `experiments.table`) -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports, at its top or inside functions alike."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n.removeprefix("resnet_jax.") for n in names if n.startswith("resnet_jax.")}
        if isinstance(node, ast.ImportFrom) and node.module == "resnet_jax":
            out |= {a.name for a in node.names}
    return out & modules


def test_no_module_imports_itself_through_others():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    # A package's own modules may import it (`experiments.runs` is imported by `experiments`);
    # a cycle between two modules is what makes a reader hold both in mind at once.
    for name in graph:
        if "." in name:
            graph[name] -= {name.rsplit(".", 1)[0]}
    done, path = set(), []

    def visit(name: str) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_package_docstring_says_where_every_module_lives():
    described = set(re.findall(r"^- `(\w+)`", resnet_jax.__doc__, re.M))
    top_level = {name.split(".")[0] for name in _modules()}
    assert described == top_level
    for name in ("table", "runs", "report"):
        assert f"`{name}`" in resnet_jax.__doc__


def test_each_module_uses_only_those_listed_before_it():
    order = re.findall(r"^- `(\w+)`", resnet_jax.__doc__, re.M)
    modules = _modules()
    for name, path in modules.items():
        top = name.split(".")[0]
        used = {dep.split(".")[0] for dep in _imports(path, set(modules))} - {top}
        later = [dep for dep in used if order.index(dep) > order.index(top)]
        assert not later, f"{name} uses {later}, listed after it in the package docstring"
