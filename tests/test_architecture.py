"""The layout's promises, checked on the source: reading needs no torch, no module imports itself back through
others (function-level imports included), and every library module stays small enough to read in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from package_files import package_sources

ROOT = Path(__file__).resolve().parent.parent  # the package root: loopscope/__init__.py
NOT_LIBRARY = ("tests", "benchmarks")
#: Real model code kept whole on purpose (a reader compares it with the upstream modeling file side by side).
LONG_ON_PURPOSE = ("models/huginn_reference.py", "models/ouro_reference.py", "examples/train_demo_model.py")
MAX_LINES = 400


def _library_modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package, tests and benchmarks left out."""
    modules = {}
    for path in package_sources(ROOT):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in NOT_LIBRARY:
            continue
        parts = ["loopscope", *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports when it runs, at any depth of its code (inside functions too);
    imports under ``if TYPE_CHECKING:`` never run and are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("loopscope"):
                return
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:  # ``from . import reader``: the module itself
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def test_reading_a_capture_needs_no_torch():
    """The format side of storage and the offline analysis import without torch (a reader's machine may lack it)."""
    code = (
        "import sys\n"
        "import loopscope, loopscope.storage.reader, loopscope.storage.merge, loopscope.storage.export\n"
        "import loopscope.storage.verify, loopscope.storage.index, loopscope.analysis\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_module_imports_itself_back():
    """No import cycle among the package's modules, function-level imports counted: each layer only looks down."""
    modules = _library_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
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
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path):
    """The cycle check above would pass on anything if it missed function-level imports: show it does not."""
    package = tmp_path / "loopscope"
    (package / "storage").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "storage" / "__init__.py").write_text("")
    (package / "storage" / "a.py").write_text("from . import b\n")
    (package / "storage" / "b.py").write_text("def f():\n    from .a import thing\n")
    modules = {"loopscope.storage.a": package / "storage" / "a.py", "loopscope.storage.b": package / "storage" / "b.py"}
    assert _imports("loopscope.storage.a", modules["loopscope.storage.a"], modules) == {"loopscope.storage.b"}
    assert _imports("loopscope.storage.b", modules["loopscope.storage.b"], modules) == {"loopscope.storage.a"}


def test_source_checks_leave_out_virtual_environments_in_the_checkout(tmp_path):
    """README's commands may run in a virtual environment made inside the checkout, under any name: the checks on
    the source read the package's files, not the environment's thousands."""
    for name in ("storage/a.py", "storage/write/b.py", "top.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    for environment in (".venv", "venv", "my-env"):
        site = tmp_path / environment / "lib" / "python3" / "site-packages"
        site.mkdir(parents=True)
        (site / "typing_extensions.py").write_text("eval('1')\n")
        (tmp_path / environment / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (tmp_path / "build" / "lib").mkdir(parents=True)
    (tmp_path / "build" / "lib" / "copy.py").write_text("")
    found = [p.relative_to(tmp_path).as_posix() for p in package_sources(tmp_path)]
    assert found == ["storage/a.py", "storage/write/b.py", "top.py"]


@pytest.mark.parametrize(
    "name", sorted(n for n, p in _library_modules().items() if p.relative_to(ROOT).as_posix() not in LONG_ON_PURPOSE)
)
def test_every_library_module_reads_in_one_sitting(name):
    path = _library_modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it along a seam"


def test_every_error_type_is_exported_from_the_package():
    import loopscope
    from loopscope import errors

    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined <= set(loopscope.__all__)
    assert all(getattr(loopscope, n) is getattr(errors, n) for n in defined)
