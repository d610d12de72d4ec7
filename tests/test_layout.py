"""The shape of the house: one namespace, dependencies pointing one way, no torch on the protocol side.

The import graph is read from the source (every import, at module level or inside a function), so
a wrong import fails here whether or not any test happens to execute it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.timing import seconds

ROOT = Path(__file__).resolve().parents[1]
# Folders of the installed namespace, lowest first: a folder may import only from folders below it.
FLOORS = {"storage": 0, "air_registry": 0, "tasks": 1, "server": 2}
PACKAGE = "imagewire"


def python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from x import y`` counts as x.y too,
    since y may be a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


MODULES = {module_name(path): path for path in python_files(*FLOORS)}


# An import statement inside a string: code that a test or the bench runs in a child interpreter.
BARE_IMPORT_IN_CODE = re.compile(r"(?m)(?:^|[;\s])(?:from|import) (?:" + "|".join(FLOORS) + r")(?:[.\s,]|$)")


def imports_in_strings(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and BARE_IMPORT_IN_CODE.search(node.value):
            yield node.lineno, node.value


def test_nothing_imports_a_bare_top_level_package() -> None:
    files = list(python_files(*FLOORS, "tests", "bench", "clients"))
    bare = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(path)
        if name.split(".")[0] in FLOORS
    ]
    bare += [f"{path.relative_to(ROOT)}:{line} runs {text!r}"
             for path in files for line, text in imports_in_strings(path)]
    assert not bare, "import these through the imagewire namespace:\n" + "\n".join(bare)


def test_dependencies_between_folders_point_down() -> None:
    upward = []
    for name, path in MODULES.items():
        floor = name.split(".")[1]
        for line, imported in imported_modules(path):
            parts = imported.split(".")
            if parts[0] != PACKAGE or len(parts) < 2 or parts[1] == floor:
                continue
            if FLOORS[parts[1]] >= FLOORS[floor]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({floor}) imports {imported}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def module_graph() -> dict[str, set[str]]:
    """Module → the modules of the namespace it imports (a package counts as its __init__)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {imported for _, imported in imported_modules(path) if imported in MODULES and imported != name}
        # A module inside a package is loaded after its package's __init__: not an edge of its own.
        graph[name] = {target for target in targets if not name.startswith(target + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node):], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_modules_import_each_other_in_one_direction() -> None:
    cycle = find_cycle(module_graph())
    assert cycle is None, "an import cycle: " + " → ".join(cycle or [])


def test_the_cycle_check_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_protocol_side_imports_no_torch() -> None:
    # A fresh interpreter: in this one, other tests have long imported torch.
    code = (
        "import sys\n"
        "import imagewire.server.protocol, imagewire.server.connection, imagewire.server.task_runner\n"
        "import imagewire.server.app, imagewire.server.http, imagewire.server.fake_engine\n"
        "import imagewire.tasks.supported, imagewire.storage, imagewire.air_registry\n"
        "from imagewire.air_registry import Catalog, resolve_sampler\n"
        "Catalog.load().resolve('tiny'); resolve_sampler('Euler a')\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub', 'ray') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=seconds(60), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# Ray (the [cluster] extra) is for --engine ray only: the gateway's compute plane and the replica beside it.
RAY_MODULES = {"imagewire.server.cluster", "imagewire.server.replica", "imagewire.server.board"}


def test_only_the_compute_plane_on_ray_imports_ray() -> None:
    importing = {name for name, path in MODULES.items()
                 for _, imported in imported_modules(path) if imported.split(".")[0] == "ray"}
    assert importing == RAY_MODULES


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Offline: the test extra brings the setuptools this pyproject needs.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True, timeout=seconds(300))
    (built,) = out.glob("imagewire-*.whl")
    return built


def test_the_wheel_installs_only_the_imagewire_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    tops = {name.split("/")[0] for name in names}
    assert tops == {"imagewire", next(top for top in tops if top.endswith(".dist-info"))}
    assert {name.split("/")[1] for name in names if name.startswith("imagewire/")} == set(FLOORS)
    assert "imagewire/air_registry/catalog.json" in names
    assert "imagewire-server = imagewire.server.__main__:main" in entry_points


def test_the_installed_server_starts_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    # -S and an explicit path: the installed copy and the third-party packages, without the editable
    # install's import hook, which would find the checkout instead.
    site_packages = [path for path in sys.path if path.endswith("site-packages")]
    environment = {"PYTHONPATH": ":".join([str(installed), *site_packages]), "PATH": "/usr/bin:/bin"}
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import imagewire.server, imagewire.air_registry.catalog as c; "
         "print(imagewire.server.__file__); print(c.Catalog.load().resolve('tiny').air)"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=seconds(60), check=True)
    location, tiny = probe.stdout.split()
    assert Path(location).is_relative_to(installed) and tiny == "imagewire:tiny@1"
    helped = subprocess.run([sys.executable, "-S", "-m", "imagewire.server", "--help"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=seconds(60), check=True)
    assert helped.stdout.startswith("usage: imagewire-server") and "--max-batch-size" in helped.stdout
