"""The shape of the code: imports flow one way (no cycle, function-level imports included), the CLI starts without
torch, no sys.path / __path__ edits, and the packaging lists every subpackage."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mixtral_quant", "mixtral_quant.cli", "mixtral_quant.kernels")  # cli/ and kernels/ install inside


def package_modules() -> dict[str, str]:
    """Every module of the installed package (dotted name -> file), subpackages included, from the files alone."""
    out = {}
    for pkg in PACKAGES:
        root = importlib.util.find_spec(pkg).submodule_search_locations[0]
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and not os.path.isfile(os.path.join(dirpath, "__init__.py")):
                dirnames.clear()  # data directories, caches
                continue
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            if prefix != pkg and prefix in PACKAGES:
                continue
            for f in filenames:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, from every import statement of its source (function-level and
    TYPE_CHECKING ones too: a lazy import is still an edge)."""
    mods = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module
                # `from pkg import sub` imports the submodule; `from mod import name` imports mod
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import mixtral_quant.kernels.nf4` -> the deepest module we have
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_graph_sees_the_imports_it_must():
    """The walker itself: known edges are found, function-level ones included."""
    g = import_graph()
    assert "mixtral_quant.loader" in g and "mixtral_quant.cli.main" in g and "mixtral_quant.kernels.nf4" in g
    assert "mixtral_quant.model" in g["mixtral_quant.loader"]
    assert "mixtral_quant.formats" in g["mixtral_quant.kernels.nf4"]  # absolute import
    assert "mixtral_quant.kernels" in g["mixtral_quant.linear"]  # an import inside a function
    assert "mixtral_quant.cli.quantize" in g["mixtral_quant.cli.main"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way():
    """README's "who may import whom", checked on the whole reachable set."""
    g = import_graph()
    ours = set(g)
    assert not g["mixtral_quant.formats"], f"formats imports nothing of ours, got {g['mixtral_quant.formats']}"
    for k in (m for m in ours if m.startswith("mixtral_quant.kernels")):
        bad = {n for n in g[k] if not n.startswith("mixtral_quant.kernels")} - {"mixtral_quant.formats"}
        assert not bad, f"{k} may import at most formats, got {bad}"
    runtime = ("model", "loader", "linear", "offload", "kernels", "generate", "evaluate")
    bad = {n for n in reachable(g, "mixtral_quant.quantize") if n.split(".")[1] in runtime}
    assert not bad, f"the quantizer reaches the runtime: {bad}"
    for m in (m for m in ours if m == "mixtral_quant.offload" or m.startswith("mixtral_quant.offload.")):
        assert "mixtral_quant.loader" not in reachable(g, m), f"{m} reaches the loader"
    for m in ours - {m for m in ours if m.startswith("mixtral_quant.cli")}:
        bad = {n for n in g[m] if n.startswith("mixtral_quant.cli")}
        assert not bad, f"{m} imports the CLI: {bad}"


def test_cli_modules_do_not_import_main():
    """Commands are registered in main.py (cli.add_command), not by importing main and decorating its group."""
    g = import_graph()
    for m in (m for m in g if m.startswith("mixtral_quant.cli.") and m != "mixtral_quant.cli.main"):
        assert "mixtral_quant.cli.main" not in g[m], m
    from mixtral_quant.cli.main import cli

    assert sorted(cli.commands) == ["chat", "demo", "eval", "generate", "inspect", "plan", "quantize", "serve"]


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_cli_starts_without_torch():
    """`mixq --help`, every command's --help and a bad argument answer without importing torch (or the library's
    torch modules): a behaviour check; the time is measured by evals/bench_startup.py."""
    out = _run(
        "import sys\n"
        "from mixtral_quant.cli.main import cli\n"
        "codes = []\n"
        "for args in [['--help'], *([c, '--help'] for c in sorted(cli.commands)), ['quantize', '-o', 'x', "
        "'--format', 'nf5'], ['plan', '--context', '0']]:\n"
        "    try:\n"
        "        cli.main(args, prog_name='mixq')\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'safetensors', "
        "'transformers', 'bitsandbytes', 'accelerate', 'huggingface_hub', 'numpy', 'fastapi', 'uvicorn', 'pydantic', 'mistral_common', 'tqdm') or m in ("
        "'mixtral_quant.formats', 'mixtral_quant.config', 'mixtral_quant.loader'))\n"
        "print(codes, heavy, file=sys.stderr)\n"
        "print(repr((codes, heavy)))\n"
    )
    codes, heavy = eval(out.splitlines()[-1])
    assert codes == [0] * 9 + [2, 2], codes  # --help exits 0; click's usage errors exit 2
    assert heavy == [], f"imported at start-up: {heavy}"


def test_package_api_is_lazy_and_the_quantize_module_is_a_module():
    out = _run(
        "import sys, types\n"
        "import mixtral_quant\n"
        "assert 'torch' not in sys.modules\n"
        "import mixtral_quant.quantize as q\n"
        "from mixtral_quant import load_quantized, quantize_checkpoint, quantize_tensor, dequantize_tensor, "
        "plan_memory\n"
        "assert isinstance(mixtral_quant.quantize, types.ModuleType) and q is mixtral_quant.quantize\n"
        "from mixtral_quant import quantize\n"
        "assert quantize is q and quantize_checkpoint is q.quantize\n"
        "import mixtral_quant.loader, mixtral_quant.formats, mixtral_quant.plan\n"
        "assert load_quantized is mixtral_quant.loader.load_quantized\n"
        "assert quantize_tensor is mixtral_quant.formats.quantize_tensor\n"
        "assert plan_memory is mixtral_quant.plan.plan_memory\n"
        "print(sorted(mixtral_quant.__all__))\n"
    )
    assert eval(out) == sorted(["load_quantized", "quantize_checkpoint", "quantize_tensor", "dequantize_tensor",
                                "plan_memory"])  # fmt: skip
    import mixtral_quant

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mixtral_quant.nope  # noqa: B018


def test_cli_names_match_the_library():
    """cli/options.py spells the format and backend names without importing torch: they must be the library's."""
    from mixtral_quant import formats, linear
    from mixtral_quant.cli import options

    assert options.FORMATS == formats.FORMATS
    assert options.BACKENDS == linear.BACKENDS


def _python_files(*dirs: str):
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, d)):
            dirnames[:] = [n for n in dirnames if not n.startswith(".") and n != "__pycache__"]
            yield from (os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))


def test_no_path_edits():
    """An editable install is how a checkout runs: no sys.path or __path__ changes in the package, tests or evals."""
    bad = []
    for path in _python_files("mixtral_quant", "cli", "kernels", "tests", "evals"):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                bad.append(f"{os.path.relpath(path, REPO)}:{node.lineno} sys.path")
            if isinstance(node, ast.Name) and node.id == "__path__":
                bad.append(f"{os.path.relpath(path, REPO)}:{node.lineno} __path__")
    assert not bad, bad


def test_every_subpackage_is_packaged():
    """pyproject.toml lists packages by hand (cli/ and kernels/ are mapped inside): a new subpackage must be listed,
    or a wheel install would lack it while the editable install hides the gap."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {m for m, p in package_modules().items() if p.endswith("__init__.py")}
    assert packages == listed, f"in the code, not in pyproject.toml: {packages - listed}; " \
                               f"listed, not in the code: {listed - packages}"
