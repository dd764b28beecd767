"""The package's layers hold: data flows one way, and no module imports another in a cycle.

Every import counts, including those inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinysam_kit"
# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = (
    ("version", "data"),
    ("models",),
    ("runtime",),
    ("inference",),
    ("training", "evaluation"),
    ("integrations",),
    ("cli",),
)
# Front ends never import each other; Ray is an execution backend they may use, and it uses neither.
INDEPENDENT = (
    ("integrations.fiftyone", "integrations.labelstudio"),
    ("integrations.labelstudio", "integrations.fiftyone"),
    ("integrations.ray", "integrations.fiftyone"),
    ("integrations.ray", "integrations.labelstudio"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "tinysam_kit" or m.startswith("tinysam_kit.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # "from pkg import name" names a module when pkg.name is one
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root re-exports the public API
    for level, names in enumerate(LAYERS):
        if parts[1] in names:
            return level
    raise AssertionError(f"{module} belongs to no layer; add its package to LAYERS")


def test_imports_never_go_up_a_layer():
    wrong = []
    for source, targets in graph().items():
        src_layer = layer_of(source)
        for target in targets:
            if target == "tinysam_kit" and source != "tinysam_kit":
                wrong.append(f"{source} imports the package root (import the defining module)")
                continue
            dst_layer = layer_of(target)
            if src_layer is not None and dst_layer is not None and dst_layer > src_layer:
                wrong.append(f"{source} -> {target}")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(wrong))


def test_front_ends_do_not_import_each_other():
    wrong = []
    for source, targets in graph().items():
        for a, b in INDEPENDENT:
            if source.startswith("tinysam_kit." + a) and any(t.startswith("tinysam_kit." + b) for t in targets):
                wrong.append(f"{source} -> {b}")
    assert not wrong, "\n".join(wrong)


def test_integrations_do_not_reach_into_networks_or_engines():
    wrong = [f"{s} -> {t}" for s, targets in graph().items() if s.startswith("tinysam_kit.integrations")
             for t in targets if t.startswith(("tinysam_kit.models.", "tinysam_kit.runtime."))]
    assert not wrong, "front ends use the inference layer, not networks or engines:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    # a package's __init__ re-exporting its own modules is not a cycle of work
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_image_loading_for_remote_processes_does_not_import_torch():
    """What Ray decode actors and worker processes unpickle to read images (the decode step and the loaders)
    imports neither PyTorch nor the package's model layers: each of those processes would pay a second of
    start-up for nothing."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import tinysam_kit.integrations.ray.decode, tinysam_kit.integrations.labelstudio.fetch\n"
            "import tinysam_kit.data.object_store\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('tinysam_kit.models',\n"
            "    'tinysam_kit.runtime', 'tinysam_kit.inference')))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
