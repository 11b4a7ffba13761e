"""Imports: no cycles among fastprompt's modules, and importing fastprompt changes no
process-wide state of numba, LLVM, OpenCV, FFCV or torch.

What counts as an import edge (`import_graph`): every `import fastprompt...` /
`from fastprompt... import ...` (relative ones resolved), at module level *and inside
functions*: a lazy import only moves a circle from import time to call time, and the
layout should not have one. Imports under `if TYPE_CHECKING:` do not count: they are never
executed and serve annotations only. `from package import name` is an edge to the
submodule `package.name` where that is a module, else to the package itself.
"""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastprompt"


def _modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) of every module under `package_dir`."""
    root = package_dir.parent
    mods = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import} within the package."""
    mods = _modules(package_dir)
    top = package_dir.name

    def known(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in mods.items():
        edges: dict[str, int] = {}

        def add(target, line):
            if target and target != module:
                edges.setdefault(target, line)

        class Visitor(ast.NodeVisitor):
            def visit_If(self, node):
                if _is_type_checking(node.test):
                    for child in node.orelse:
                        self.visit(child)
                else:
                    self.generic_visit(node)

            def visit_Import(self, node):
                for alias in node.names:
                    if alias.name.split(".")[0] == top:
                        add(known(alias.name), node.lineno)

            def visit_ImportFrom(self, node):
                if node.level:  # relative: from the module's package, up level - 1
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != top:
                    return
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    add(sub if sub in mods else known(source), node.lineno)

        Visitor().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component (a shortest one through its first module), as [a, ..., a]."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):  # Tarjan; the graph has ~60 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_shortest_cycle(graph, component) for component in components]


def _shortest_cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """Breadth-first from the component's first module back to itself, inside the component."""
    start = min(component)
    paths, frontier = {start: [start]}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in component and w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a cycle")  # a strongly connected component always is


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_fastprompt_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "fastprompt.data.loaders" in graph and "fastprompt.bench.measure" in graph
    assert "fastprompt.data.pipelines" in graph["fastprompt.data.beton"]  # a function-level import counts
    assert "fastprompt.data.beton" not in graph["fastprompt.data.loaders"]  # a TYPE_CHECKING one does not
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(describe(c, graph) for c in cycles)


def test_cycle_finder_names_module_level_and_lazy_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "import os\n\ndef thing():\n    from pkg.sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\n",  # relative, two levels: pkg.a
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "e.py": "from pkg import d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert describe(cycles[0], graph) == "pkg.a (line 1) -> pkg.b (line 4) -> pkg.sub.c (line 1) -> pkg.a"


# The probe runs in a fresh interpreter: it imports numba, llvmlite, FFCV (every submodule),
# OpenCV and torch, records their process-wide state, imports every fastprompt module, and
# records it again; then applies the FFCV workarounds on purpose, which must show up (so the
# probe can see what it looks for).
PROBE = textwrap.dedent(r'''
    import ctypes, importlib, inspect, json, pkgutil, sys
    import numba, numba.typed, llvmlite.binding as llvm, torch
    numba.typed.Dict = dict  # FFCV's import-time typed Dict, as fastprompt imports it (ffcv_compat, workaround 0)
    import ffcv, ffcv._libffcv
    del numba.typed.Dict
    for info in pkgutil.walk_packages(ffcv.__path__, "ffcv."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # optional dependencies (e.g. cupy)
            pass
    try:
        import cv2
    except ImportError:
        cv2 = None

    def opencv_threads():
        with open("/proc/self/maps") as maps:
            paths = sorted({l.split()[-1] for l in maps if "libopencv_core.so" in l})
        out = {}
        for path in paths:
            get = getattr(ctypes.CDLL(path), "_ZN2cv13getNumThreadsEv", None)
            if get is not None:
                get.restype = ctypes.c_int
                out[path] = get()
        if cv2 is not None:
            out["cv2"] = cv2.getNumThreads()
        return out

    def ffcv_attributes():
        out = {}
        for name, module in sorted(sys.modules.items()):
            if name.split(".")[0] != "ffcv" or module is None:
                continue
            for attr, value in sorted(vars(module).items()):
                out[f"{name}.{attr}"] = id(value)
                if inspect.isclass(value) and value.__module__ == name:
                    for member, v in sorted(vars(value).items()):
                        out[f"{name}.{attr}.{member}"] = id(v)
        return out

    def state():
        return {
            "numba": {k: repr(v) for k, v in sorted(vars(numba.config).items()) if k.isupper()},
            "llvm": {s: llvm.address_of_symbol(s) for s in ("fastprompt_ffcv_imdecode", "fastprompt_ffcv_resize")},
            "opencv": opencv_threads(),
            "ffcv": ffcv_attributes(),
            "torch_threads": torch.get_num_threads(),
        }

    def diff(a, b):
        keys = sorted(set(a) | set(b))
        return {k: [a.get(k), b.get(k)] for k in keys if a.get(k) != b.get(k)}

    before = state()
    import fastprompt
    names = [info.name for info in pkgutil.walk_packages(fastprompt.__path__, "fastprompt.")]
    for name in names:
        importlib.import_module(name)
    after = state()
    from fastprompt.data.ffcv_compat import apply_ffcv_compat
    apply_ffcv_compat()
    applied = state()
    print(json.dumps({"modules": names, "changed": {k: diff(before[k], after[k]) for k in ("numba", "llvm", "opencv", "ffcv")}
                      | {"torch_threads": [before["torch_threads"], after["torch_threads"]]},
                      "applied": {k: diff(after[k], applied[k]) for k in ("llvm", "ffcv")},
                      "opencv_before": before["opencv"], "opencv_applied": applied["opencv"]}))
''')


@pytest.mark.slow
def test_importing_fastprompt_changes_no_global_state():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"fastprompt.cli", "fastprompt.data.loaders", "fastprompt.data.decoders", "fastprompt.bench.anchor",
            "fastprompt.kernels.prefix_attention"} <= set(report["modules"])
    changed = report["changed"]
    torch_before, torch_after = changed.pop("torch_threads")
    assert torch_before == torch_after
    assert changed == {"numba": {}, "llvm": {}, "opencv": {}, "ffcv": {}}
    # The probe sees the changes when they are made on purpose:
    applied = report["applied"]
    assert all(v[0] is None and v[1] for v in applied["llvm"].values()) and len(applied["llvm"]) == 2
    assert "ffcv.memory_managers.os_cache.OSCacheManager.compile_reader" in applied["ffcv"]
    assert "ffcv.pipeline.compiler.Compiler.compile" in applied["ffcv"]
    system_opencv = {path: n for path, n in report["opencv_applied"].items() if path != "cv2"}
    assert system_opencv and set(system_opencv.values()) == {1}, report["opencv_applied"]  # libffcv's OpenCV
    assert report["opencv_applied"].get("cv2") == report["opencv_before"].get("cv2")  # pip's cv2 is left alone


LIGHT_ERRORS = textwrap.dedent('''
    import json, sys
    from typer.testing import CliRunner
    from fastprompt.cli import app
    out = []
    for args in json.loads(sys.argv[1]):
        result = CliRunner().invoke(app, args)
        out.append([result.exit_code, result.output.strip().splitlines()[-1], "torch" in sys.modules])
    print(json.dumps(out))
''')


def test_report_refuses_a_wrong_folder_without_importing_torch(tmp_path):
    """`fastprompt report`'s bad-input errors answer without torch (~5 s and 1.1 GB saved; issue 21 §4)."""
    (tmp_path / "empty").mkdir()
    cases = [["report", str(tmp_path / "missing")], ["report", str(tmp_path / "empty")],
             ["report", str(tmp_path / "empty"), "--format", "xml"]]
    run = subprocess.run([sys.executable, "-c", LIGHT_ERRORS, json.dumps(cases)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [code for code, _, _ in results] == [2, 2, 2], results
    assert all(line.startswith("error: ") for _, line, _ in results), results
    assert [imported for _, _, imported in results] == [False, False, False], results


def test_train_sweep_eval_refuse_bad_input_without_importing_torch(tmp_path):
    """A typo or a bad value in train / sweep / eval is refused before torch loads (issue 21 §4,
    issue 25 §12: each such error cost ~6 s and 1.15 GB): the methods' declarations, the
    generated flags, `TrainConfig`, the sidecar and the run folder are all torch-free."""
    from fastprompt.data import write_demo

    missing, demo = str(tmp_path / "missing.beton"), str(tmp_path / "demo.beton")
    write_demo(demo, images_per_class=3, image_size=32, seed=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.json").write_text("{}")  # a user's folder, not a run
    tiny = ["--clip", "fastprompt-tiny", "--pretrained", "none"]
    cases = [
        ["methods"],
        ["train", "--method", "cop", "--data", missing],  # unknown method (a click choice)
        ["train", "--method", "coop", "--coop.nctx", "3", "--data", missing],  # unknown generated flag
        ["train", "--method", "coop", "--vpt.n-prompts", "3", "--data", missing],  # another method's option
        ["train", "--method", "coop", "--coop.n-ctx", "0", "--data", missing],  # an option's value
        ["train", "--method", "coop", "--momentum", "5", "--data", missing],  # a TrainConfig value
        ["train", "--method", "coop", "--data", missing],  # no such data
        ["train", "--method", "coop", "--protocol", "coop", "--data", missing],  # a protocol reads the sidecar
        ["train", "--method", "coop", "--protocol", "nope", "--data", missing],
        ["train", "--method", "coop", "--data", demo, "--epochs", "1", *tiny],  # the plan: warm-up leaves no epoch
        ["train", "--method", "cavpt", "--protocol", "cavpt", "--data", demo, "--lr.text", "1", *tiny],  # a group it does not train
        ["train", "--method", "coop", "--data", demo, "--out", str(tmp_path / "mine"), *tiny],  # not a run folder
        ["sweep", "--methods", "cop", "--data", missing, "--out", str(tmp_path / "s")],
        ["sweep", "--methods", "coop", "--data", missing, "--out", str(tmp_path / "s")],
        ["eval", str(tmp_path), "--data", missing],  # not a finished run
        ["eval", str(tmp_path), "--data", missing, "--device", "gpu"],
    ]
    run = subprocess.run([sys.executable, "-c", LIGHT_ERRORS, json.dumps(cases)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [code for code, _, _ in results] == [0] + [2] * (len(cases) - 1), results
    assert all(line.startswith("error: ") for _, line, _ in results[1:]), results
    assert [imported for _, _, imported in results] == [False] * len(cases), results


def test_dir_lists_the_public_api_without_importing_torch():
    """`dir(fastprompt)` names what `__all__` and the lazy attributes offer (issue 25 §6), and
    asking for it imports nothing heavy."""
    probe = "import fastprompt, json, sys; print(json.dumps([dir(fastprompt), 'torch' in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    names, torch_loaded = json.loads(run.stdout.strip().splitlines()[-1])
    public = [n for n in names if not n.startswith("_")]
    assert public == ["FastpromptError", "create_model", "create_model_and_transforms", "data", "list_methods",
                      "load_run", "methods", "models"]
    assert "__version__" in names and not torch_loaded
    import fastprompt

    assert all(getattr(fastprompt, n) is not None for n in fastprompt.__all__)  # each listed name resolves
