"""The package's import graph, read from the source with `ast`, has no cycle.

Every module of `seed_fast` is parsed, the ones that setup.py maps in from the top-level `kernels/` and
`export/` folders too. An edge goes from a module to each of the package's own modules it imports, at
module level or inside a function, relative imports resolved: `from pkg import name` depends on the
module `pkg.name` when there is one, else on `pkg`.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "seed_fast"


def _source_folders() -> dict:
    """setup.py's SOURCE_FOLDERS ({package: top-level folder}), read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCE_FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no SOURCE_FOLDERS")


def package_modules() -> dict:
    """{dotted module name: (path, is_package)} for every module of the package."""
    modules = {}

    def add(folder: Path, prefix: str):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = (path, is_package)

    add(ROOT / PACKAGE, PACKAGE)
    for package, folder in _source_folders().items():
        add(ROOT / folder, package)
    return modules


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict | None = None) -> dict:
    """{module: {package modules it imports}} over module-level and function-local imports."""
    modules = package_modules() if modules is None else modules
    graph = {}
    for name, (path, is_package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                # `import a.b.c` names a.b.c; keep the longest prefix that is one of the package's modules
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict) -> list | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_every_module_is_parsed():
    modules = package_modules()
    for name in ("seed_fast", "seed_fast.cli", "seed_fast.kernels.codebook_lookup", "seed_fast.export.to_onnx"):
        assert name in modules
    graph = import_graph(modules)
    assert "seed_fast.ops.codebook_lookup" in graph["seed_fast.ops"]


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    graph["c"] = {"d"}
    assert find_cycle(graph) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


APPLICATION = "seed_fast.default_model"


def test_the_library_never_imports_the_application():
    """Only the command line may import the default-model package; the library under it never does."""
    graph = import_graph()
    assert APPLICATION in graph
    offenders = {
        name: sorted(d for d in deps if d == APPLICATION or d.startswith(APPLICATION + "."))
        for name, deps in graph.items()
        if not (name == APPLICATION or name.startswith(APPLICATION + ".")) and name != "seed_fast.cli"
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules importing {APPLICATION}: {offenders}"


def test_package_data_ships_every_asset():
    import fnmatch
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data[APPLICATION]
    folder = ROOT / APPLICATION.replace(".", "/")
    assets = [p.relative_to(folder).as_posix() for p in (folder / "assets").rglob("*") if p.is_file()]
    assert assets
    missed = [a for a in assets if not any(fnmatch.fnmatch(a, g) and a.count("/") == g.count("/") for g in globs)]
    assert not missed, f"pyproject.toml's package-data leaves out {missed}"


# A function-local import of the package's own modules hides a dependency; it stays local only for
# one of these reasons, keyed by (importing module, imported module prefix).
LOCAL_IMPORTS_ALLOWED = {
    ("seed_fast.cli", "seed_fast"): "each subcommand imports what it runs, so `seed-fast --help` stays fast",
    ("seed_fast", "seed_fast.models"): "`import seed_fast` loads the models on first use of a public name",
    ("seed_fast.export", "seed_fast.export"): "the exporters need onnx / tensorrt, optional extras",
    ("seed_fast.jobs.tokenize_dataset", "seed_fast.jobs.tokenize_dataset"): "__main__ runs the module as imported",
    ("*", "seed_fast.kernels"): "the Triton kernels need triton, optional on CPU-only machines",
    ("*", "seed_fast.models.decoders"): "the image decoders need diffusers, an optional extra",
}


def _allowed(importer: str, target: str) -> bool:
    for (who, prefix), _reason in LOCAL_IMPORTS_ALLOWED.items():
        if who in ("*", importer) and (target == prefix or target.startswith(prefix + ".")):
            return True
    return False


def function_local_imports(modules: dict | None = None) -> list:
    """(module, line, imported module) of every own-module import below module level."""
    modules = package_modules() if modules is None else modules
    found = []
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append((name, node.lineno, target))
    return found


def test_own_modules_are_imported_at_the_top():
    hidden = [f"{m}:{line} imports {t}" for m, line, t in function_local_imports() if not _allowed(m, t)]
    assert not hidden, "import these at the top of the module (or add a reason):\n" + "\n".join(hidden)


def test_the_local_import_check_finds_a_planted_one(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("def g():\n    from seed_fast.kernels import k\n")
    modules = {"seed_fast": (pkg / "__init__.py", True), "seed_fast.a": (pkg / "a.py", False)}
    modules["seed_fast.b"] = (pkg / "b.py", False)
    found = function_local_imports(modules)
    assert ("seed_fast.a", 2, "seed_fast.b") in found
    assert [t for m, _, t in found if not _allowed(m, t)] == ["seed_fast.b"]
