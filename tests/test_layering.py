"""The package's layering, as README's Architecture section draws it, holds in the code.

README shows ``fusiontrain/`` as a tree, one line per package or top-level module, highest layer
first. Every import in the package (module-level or inside a function; not under
``if TYPE_CHECKING:``) must go to the importing file's own package or to a line below it; and
neither packages nor files import each other in a cycle. Shown once by hand: adding
``from fusiontrain.train.trainer import Trainer`` inside a function of ``fusiontrain/data/batch.py``
fails both tests.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fusiontrain"
LAYERS_BLOCK = re.compile(r"<!-- layers: top imports bottom -->\n```\nfusiontrain/\n(.*?)```\n<!-- /layers -->", re.S)


def readme_layers() -> list[list[str]]:
    """The layers README draws, highest first: each a list of unit names (``train``, ``config``,
    ``cli``, ``__main__``)."""
    match = LAYERS_BLOCK.search((REPO / "README.md").read_text())
    assert match, "README.md lacks its layers block (<!-- layers: top imports bottom --> ... <!-- /layers -->)"
    layers = []
    for line in match.group(1).splitlines():
        names = []
        for word in line.split():
            if word.endswith("/") or word.endswith(".py"):
                names.append(word.removesuffix("/").removesuffix(".py"))
            else:
                break
        assert names, f"README layers line without a package or module: {line!r}"
        layers.append(names)
    return layers


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its package under fusiontrain, or its top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""  # "" is the root package (its version only)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str:
    """``name`` as the module it names: itself when it is a module or package, else its parent
    (``from fusiontrain.data import Batch`` imports ``fusiontrain.data``)."""
    path = REPO / Path(*name.split("."))
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return name
    return name.rpartition(".")[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every fusiontrain module ``path`` imports, at any depth."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, _resolve(a.name)) for a in node.names if a.name.split(".")[0] == "fusiontrain")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "fusiontrain":
            for alias in node.names:  # ``from fusiontrain.parallel import distributed`` imports a module
                found.append((node.lineno, _resolve(f"{node.module}.{alias.name}")))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_readme_layers_name_every_package_and_top_level_module_once() -> None:
    drawn = [name for layer in readme_layers() for name in layer]
    assert len(drawn) == len(set(drawn)), drawn
    present = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    present |= {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert set(drawn) == present, f"README draws {sorted(set(drawn) - present)} that do not exist and lacks {sorted(present - set(drawn))}"


def test_every_import_goes_down_the_layers() -> None:
    rank = {name: depth for depth, layer in enumerate(readme_layers()) for name in layer}  # 0 = highest
    wrong = []
    for path in package_files():
        source = _unit(_module_name(path))
        for line, target in imports_of(path):
            unit = _unit(target)
            if unit in ("", source):
                continue
            if rank[unit] < rank[source]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target} ({unit} is not below {source})")
    assert not wrong, "imports against README's layers:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycles_between_files_or_packages() -> None:
    files: dict[str, set[str]] = defaultdict(set)
    packages: dict[str, set[str]] = defaultdict(set)
    for path in package_files():
        module = _module_name(path)
        for _, target in imports_of(path):
            if target != module:
                files[module].add(target)
            if _unit(target) not in ("", _unit(module)):
                packages[_unit(module)].add(_unit(target))
    assert not _cycles(packages), f"package import cycles: {_cycles(packages)}"
    assert not _cycles(files), f"file import cycles: {_cycles(files)}"


def test_benchmarks_and_scripts_never_import_the_tests() -> None:
    """Tests may use benchmark code (``benchmarks.models``); the other way round, a benchmark would
    depend on test fixtures."""
    wrong = []
    for path in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            wrong += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "tests"]
    assert not wrong, wrong


def test_every_project_import_of_the_benchmarks_and_scripts_resolves() -> None:
    """Imports inside functions run only when a benchmark does (on an idle machine, or a GPU), so a
    name the package moved would break them unseen: ``dataloader_start.py`` imported
    ``free_port`` from ``fusiontrain.parallel.distributed`` long after it had gone."""
    import importlib

    missing = []
    for path in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            if node.module.split(".")[0] not in ("fusiontrain", "benchmarks"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name):
                    try:  # a submodule not imported by its package yet
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
    assert not missing, missing


# Files that one concept makes long, named in README's Architecture section.
LONG_FILES = {"fusiontrain/config.py", "fusiontrain/tiny.py"}


def test_a_small_top_level_and_short_files() -> None:
    """At most 8 modules at the top of the package besides ``__init__`` and ``__main__``; no file
    over 500 lines but the ones README names."""
    top = sorted(path.name for path in PACKAGE.glob("*.py") if path.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 8, top
    long = {path.relative_to(REPO).as_posix() for path in package_files() if len(path.read_text().splitlines()) > 500}
    assert long <= LONG_FILES, f"over 500 lines: {sorted(long - LONG_FILES)}"
    readme = (REPO / "README.md").read_text()
    assert all(f"`{Path(name).name}`" in readme for name in LONG_FILES)
