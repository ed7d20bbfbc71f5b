"""The package's shape: no import circle, the runtime never imports the lab, hosts never import each other (shared
host helpers import no host)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adaptive_sampler"
RUNTIME = ("adaptive_sampler.oracles", "adaptive_sampler.engine", "adaptive_sampler.sampling", "adaptive_sampler.hosts")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports (at any depth of the file: lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("adaptive_sampler") and c in MODULES)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_there_is_no_import_circle():
    # Package __init__ modules re-export their children; an edge from a child to its own parent package is the
    # usual "import the sibling through the package" and would close a trivial loop, so the check follows
    # parent -> child edges only downwards.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if _is_under(node, dep):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if any(_is_under(n, r) for r in RUNTIME)))
def test_runtime_imports_nothing_from_the_lab(name):
    reached, todo = set(), [name]
    while todo:  # everything importing ``name`` loads, directly or not
        for dep in GRAPH[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not any(_is_under(dep, "adaptive_sampler.lab") or dep == "adaptive_sampler.__main__" for dep in reached), \
        sorted(reached)


#: The host modules: each is one host's glue. The other modules under ``hosts/`` are shared helpers (what the
#: A1111-family hosts share, what the ComfyUI-style backends share), which hosts may use and which use no host.
HOSTS = {f"adaptive_sampler.hosts.{name}" for name in ("a1111", "comfyui", "diffusers", "forge")}
SHARED = {n for n in MODULES if n.startswith("adaptive_sampler.hosts.") and n not in HOSTS}


def test_every_host_module_is_known():
    assert HOSTS <= set(MODULES), sorted(HOSTS - set(MODULES))


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_a_host_needs_nothing_from_another_host(name):
    assert not GRAPH[name] & (HOSTS - {name})


@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_shared_host_helper_needs_no_host(name):
    reached, todo = set(), [name]
    while todo:
        for dep in GRAPH[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert not reached & HOSTS, sorted(reached & HOSTS)


def test_the_oracle_contract_imports_no_strategy():
    assert GRAPH["adaptive_sampler.oracles.base"] == set()
