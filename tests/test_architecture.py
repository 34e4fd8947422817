"""The package layout: folders import only the stages below them, no import cycles, and the
method registry is the only list of method names."""

import ast
from pathlib import Path

import pytest

from adamerge.methods import registry

PKG = Path(__file__).resolve().parents[1] / "adamerge"

# unit (folder or top-level module) -> units it may import; commands and the package root may
# import anything. Mirrors the "May import" line of each folder's __init__ docstring.
ALLOWED = {
    "errors": set(), "options": set(),
    "io": {"errors"},
    "engine": {"io", "errors"},
    "data": {"io", "errors"},
    "models": {"engine", "data", "io", "errors"},
    "report": {"io", "errors", "options"},
    "methods": {"engine", "models", "data", "io", "report", "errors"},
    "compare": {"methods", "models", "data", "engine", "io", "report", "errors"},
    "suites": {"engine", "models", "data", "io", "errors"},
    "exported": {"suites", "models", "methods", "io", "errors"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """adamerge modules imported anywhere in ``path`` (function-level imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "adamerge"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "adamerge":
                continue
            found.add(target)
            for alias in node.names:  # `from . import registry` imports a module
                if (PKG.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").is_file():
                    found.add(f"{target}.{alias.name}")
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def test_every_folder_imports_only_the_stages_below_it():
    wrong = []
    for name, path in MODULES.items():
        own = unit(name)
        if own not in ALLOWED:
            continue
        for target in imports(path):
            other = unit(target)
            if other != own and other not in ALLOWED[own]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_the_engine_knows_nothing_of_methods_commands_or_suites():
    for name, path in MODULES.items():
        if unit(name) == "engine":
            assert not {unit(t) for t in imports(path)} & {"methods", "commands", "suites", "models", "data"}, name


def test_no_import_cycles():
    graph = {name: {t for t in imports(path) if t in MODULES and t not in ("adamerge", name)}
             for name, path in MODULES.items() if name != "adamerge"}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
                            if nxt in trail else f"import cycle through {nxt}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_each_folder_says_what_lives_there_and_what_it_may_import():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80 and "May import" in doc, init


# where code outside the package may list methods: nowhere (scripts and tests ask the registry)
OUTSIDE = sorted([*(PKG.parent / "scripts").glob("*.py"), *(PKG.parent / "tests").glob("*.py")])


def test_the_registry_is_the_only_list_of_method_names():
    """No list, tuple, set or dict literal outside the registry holds two method names, in the
    package or its scripts; in the tests, no dict literal is keyed by method names (per-method
    facts such as learning rates or steps belong to the registry; a test may still pick the rows
    it runs). ``__all__`` lists Python names, some of which are also method names: not counted."""
    names = set(registry.names())
    offenders = []
    files = {**MODULES, **{str(p.relative_to(PKG.parent)): p for p in OUTSIDE}}
    for name, path in files.items():
        if name == "adamerge.methods.registry":
            continue
        only_dicts = name.startswith("tests/")
        tree = ast.parse(path.read_text())
        exported = {id(n) for a in ast.walk(tree) if isinstance(a, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in a.targets) for n in ast.walk(a.value)}
        for node in ast.walk(tree):
            if id(node) in exported:
                continue
            items = node.keys if isinstance(node, ast.Dict) else \
                node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and not only_dicts else []
            hits = [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]
            if len(hits) >= 2:
                offenders.append(f"{name}:{node.lineno} {hits}")
    assert not offenders, offenders


def test_the_layout_check_sees_a_violation(tmp_path):
    """The import scanner resolves relative imports (else the tests above could not fail)."""
    bad = PKG / "engine" / "merged_model.py"
    assert "adamerge.engine.task_vectors" in imports(bad)
    assert "adamerge.methods.registry" in imports(PKG / "commands" / "bench.py")
    assert "adamerge.methods.registry" in imports(PKG / "methods" / "__init__.py")
