"""The shape of the tree, read from the source (ast; nothing is imported): no import cycle, no arrow against
the layers, typed options, few top-level modules, short files.

Layers, lowest first; a module may import its own package and lower layers, never a higher one or a peer
(the same rank, another package). trainer -> dbkernels; bench -> both; dbkernels imports neither.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "dbkernels", "bench")

TRAINER_LAYERS = (  # rank: packages (or modules) of trainer/
    ("trainer.errors",),
    ("trainer.options",),
    ("trainer.formats",),
    ("trainer.families", "trainer.distributed"),
    ("trainer.methods",),
    ("trainer.core",),
    ("trainer.memory",),
    ("trainer.world",),
    ("trainer.fabric",),
    ("trainer.ui",),  # the web app: over the commands' options and child processes of `dbtrain`
    ("trainer",),  # the commands: trainer.commands, trainer.cli, `python -m trainer`
)
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 8


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the tree that `name` imports anywhere in its source (functions too)."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, name, path.name == "__init__.py")
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        out.update(t for t in targets if t in known and t != name)  # (not: the compiled extension, other packages)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> tuple[int, str]:
    """(rank, the layer's package) of a trainer module."""
    best = None
    for rank, members in enumerate(TRAINER_LAYERS):
        for m in members:
            if (module == m or module.startswith(m + ".")) and (best is None or len(m) > len(best[1])):
                best = (rank, m)
    assert best is not None, f"{module} is in no layer of TRAINER_LAYERS"
    return best


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    wrong = []
    for src, targets in graph().items():
        top = src.split(".")[0]
        for dst in targets:
            other = dst.split(".")[0]
            if top == "dbkernels" and other != "dbkernels":
                wrong.append(f"{src} -> {dst} (the kernel library imports neither the trainer nor the bench)")
            elif top == "trainer" and other == "bench":
                wrong.append(f"{src} -> {dst} (the product imports no benchmark code)")
            elif top == other == "trainer":
                (r_src, l_src), (r_dst, l_dst) = layer_of(src), layer_of(dst)
                if l_src != l_dst and r_dst >= r_src:
                    wrong.append(f"{src} ({l_src}) -> {dst} ({l_dst}): against the layers")
    assert wrong == []


def test_every_layer_says_what_it_owns():
    """Each of trainer's packages opens with a paragraph: what it owns and what it may import."""
    for init in [ROOT / "trainer" / "errors.py", *sorted((ROOT / "trainer").rglob("__init__.py"))]:
        if "assets" in init.parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 25, f"{init}: a docstring saying what the package owns and may import"
        if init.parent.name != "trainer":
            assert "import" in doc, f"{init}: say what it may import"


def test_the_checker_sees_a_cycle_and_an_upward_arrow():
    """The two checks above can fail: a cycle and an arrow against the layers are found."""
    g = {"trainer.core.loop": {"trainer.options.train"}, "trainer.options.train": {"trainer.core.loop"}}
    assert cycles(g) == [["trainer.core.loop", "trainer.options.train"]]
    assert layer_of("trainer.options.train")[0] < layer_of("trainer.core.loop")[0]
    tree_g = graph()
    assert "trainer.core.step" in tree_g["trainer.core.loop"]  # functions' imports are seen
    assert "trainer.world.evaluate" in tree_g["trainer.commands.evaluate"]


def test_options_are_read_as_typed_fields():
    """No `getattr(cfg, "name", default)`-style option reads: options are dataclass fields."""
    pattern = re.compile(r"\b(?:get|has)attr\(\s*(?:cfg|args|opts|options|a|self\.cfg|run\.cfg|run\.opts)\s*,")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "trainer").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_few_top_level_modules_and_short_files():
    top = sorted(p.name for p in (ROOT / "trainer").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = [f"{p.relative_to(ROOT)}: {n}" for pkg in (*PACKAGES, "tests") for p in sorted((ROOT / pkg).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == []
