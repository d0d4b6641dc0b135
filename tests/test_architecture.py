"""The rooms of the package import only downwards."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tensornet_llm

PACKAGE = Path(tensornet_llm.__file__).resolve().parent
#: What each room may import from the package (itself included). ``top`` is the package's own
#: modules (``__init__``, ``cli``): they may import everything.
ALLOWED = {
    "layers": {"layers"},
    "helpers": {"helpers"},
    "saving": {"saving", "layers", "helpers"},
    "compress": {"compress", "saving", "layers", "helpers"},
    "train": {"train", "compress", "saving", "layers", "helpers"},
}
#: Modules every room may import: the exception types.
SHARED = {"tensornet_llm.errors"}
#: Third-party packages the layers may use: they must run with torch and opt_einsum alone.
LAYER_DEPENDENCIES = {"torch", "opt_einsum"}


def room_of(dotted: str) -> str:
    """``tensornet_llm.compress.fit`` -> ``compress``; the package's own modules -> ``top``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "top"


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def imports_of(dotted: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of every module imported anywhere in the file (functions included)."""
    is_package = path.name == "__init__.py"
    base = dotted.split(".") if is_package else dotted.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module
            # "from . import x" imports the submodule x
            names = [f"{module}.{a.name}" for a in node.names] if not node.module else [module]
            found += [(n, node.lineno) for n in names]
    return found


MODULES = package_modules()


def test_every_room_has_a_package_docstring_and_exports():
    for room in ALLOWED:
        package = importlib.import_module(f"tensornet_llm.{room}")
        assert package.__doc__ and len(package.__doc__.split()) >= 20, room
        assert package.__all__ and all(hasattr(package, n) for n in package.__all__), room


@pytest.mark.parametrize("dotted,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_run_downwards(dotted, path):
    room = room_of(dotted)
    for target, line in imports_of(dotted, path):
        top = target.split(".")[0]
        if target in SHARED:
            continue
        if top == "tensornet_llm":
            target_room = room_of(target)
            if room != "top":
                assert target_room in ALLOWED[room], (
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({room}) imports {target} "
                    f"({target_room}); {room} may import only {sorted(ALLOWED[room])}"
                )
        elif room == "layers":
            assert top in sys.stdlib_module_names or top in LAYER_DEPENDENCIES, (
                f"{path.relative_to(PACKAGE.parent)}:{line}: the layers import {target}; they "
                f"must run with {sorted(LAYER_DEPENDENCIES)} and the standard library alone"
            )


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check above can fail: a relative import out of layers into compress is caught."""
    fake = tmp_path / "tensornet_llm" / "layers" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..compress.fit import stable_cholesky\n"
                    "import transformers\n")
    found = dict(imports_of("tensornet_llm.layers.bad", fake))
    assert room_of("tensornet_llm.compress.fit") not in ALLOWED["layers"]
    assert "tensornet_llm.compress.fit" in found and "transformers" in found


def test_layers_run_without_transformers_accelerate_or_safetensors():
    """In a fresh interpreter where those packages cannot be imported, the whole package still
    imports and a layer computes (they are imported only inside the functions needing them)."""
    code = (
        "import sys\n"
        "for m in ('transformers', 'accelerate', 'safetensors', 'tqdm', 'matplotlib', 'peft'):\n"
        "    sys.modules[m] = None\n"
        "import torch\n"
        "from tensornet_llm.layers import MPOLinear\n"
        "layer = MPOLinear.from_linear(torch.nn.Linear(24, 36), chi=4)\n"
        "assert layer(torch.randn(5, 24)).shape == (5, 36)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def import_graph(modules: list[tuple[str, Path]]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions alike (a lazy
    import is still a dependency). ``from pkg import name`` counts as importing ``pkg.name``
    where that is a module, else ``pkg`` itself."""
    known = {dotted for dotted, _ in modules}
    graph = {}
    for dotted, path in modules:
        edges = set()
        for target, _ in imports_of(dotted, path):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != dotted:
                edges.add(target)
        graph[dotted] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def private_imports(dotted: str, path: Path) -> list[str]:
    """``from <another package module> import _name`` in the file: a private name used across
    modules (a name that another module needs belongs in the public API of its home)."""
    is_package = path.name == "__init__.py"
    base = dotted.split(".") if is_package else dotted.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "tensornet_llm" or module == dotted:
                continue
            found += [f"{path.name}:{node.lineno} imports {a.name} from {module}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def package_graph() -> dict[str, set[str]]:
    """The import graph of the package's modules. A package's ``__init__`` only gathers names
    for the reader: an import from it stands for imports of every module it gathers from."""
    graph = import_graph(MODULES)
    inits = {dotted for dotted, path in MODULES if path.name == "__init__.py"}

    def through(target: str, seen: frozenset = frozenset()) -> set[str]:
        if target not in inits:
            return {target}
        return {m for t in graph[target] - seen for m in through(t, seen | {target})}

    return {m: {t for e in edges for t in through(e)} - {m}
            for m, edges in graph.items() if m not in inits}


def test_no_import_cycles():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    found = [hit for dotted, path in MODULES for hit in private_imports(dotted, path)]
    assert not found, found


def test_the_cycle_and_private_checks_can_fail(tmp_path):
    """The checks above see a cycle through a lazy import and a private name imported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    fake = tmp_path / "tensornet_llm" / "compress" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from .compactify import _helper, public\n")
    assert private_imports("tensornet_llm.compress.bad", fake) == [
        "bad.py:2 imports _helper from tensornet_llm.compress.compactify"]
    graph = import_graph([("tensornet_llm.compress.bad", fake),
                          ("tensornet_llm.compress.compactify", PACKAGE / "compress" / "compactify.py")])
    assert graph["tensornet_llm.compress.bad"] == {"tensornet_llm.compress.compactify"}
