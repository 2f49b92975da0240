"""Static measure of how the package is built: sizes, imports, where the parameters object travels (stdlib only).

    python benchmarks/structure.py [--src src/aitraining] [--ranks cli,project,...] [--out PATH]

Modules: the .py files under --src, named by path (``teacher/cache.py`` is ``teacher.cache``, a subpackage's
``__init__.py`` the subpackage, the root one ``__init__``).  Ranks: --ranks (top first), else ``LAYERS`` of
tests/unit/test_structure.py (flat, or a list of lists sharing a rank); a module takes the rank of the longest listed
prefix of its name (``teacher.cache``, else ``teacher``).  "b above a": b's rank is listed earlier (unranked: never).

- sizes: lines per module; largest.
- imports of package modules, one per (statement, package module bound): ``from aitraining import a, b`` is 2,
  ``from aitraining.x import f, g`` is 1.  in_function: inside a def at any depth; module_level: the rest;
  type_checking: under ``if TYPE_CHECKING:`` (apart, not in the graph); by_module: in-function ones per importer.
  external_in_function: in-function imports of other modules, per statement and top-level name (stdlib/third_party).
- graph: a -> b when a imports b (module level or in a def); cycles: its strongly connected components of more than
  one module; upward: its edges a -> b with b above a.
- params_functions: defs (methods, nested defs too) with a parameter annotated LLMTrainingParams (also
  ``x.LLMTrainingParams``, ``| None``, ``Optional[...]``, string annotations).
- walk: from ``run`` of module ``train`` (re-exports followed).  A def's parameters variables: its parameters annotated
  as above, and locals assigned ``<variable>.model_copy(...)``.  Rule "object" follows the def's calls (nested defs
  and lambdas included) passing such a variable by name, positionally or as a keyword value; rule "values" also those
  with an argument using it (``params.model``).  Callees are package defs: names through the module's imports (module
  level or in a def, re-exports followed) or its own defs, ``self.m`` the method of the enclosing class, a class its
  ``__init__`` (none: not followed).  modules_entered: modules of the defs reached (train included); moves: distinct
  (caller def, callee def) edges between modules; moves_up: those into a module above the caller's.  reading: the
  same calls read depth-first in source order, each def expanded once and calls back into the current chain skipped;
  moves: file switches, returns included; up: switches into a file above the one left.
- teacher_model_files: modules that read (load) an attribute ``.teacher_model``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARAMS = "LLMTrainingParams"
Def = ast.FunctionDef | ast.AsyncFunctionDef
Binding = tuple[str, str | None]  # (package module, attribute of it or None for the module itself)


class Module:
    def __init__(self, name: str, path: Path, is_package: bool) -> None:
        self.name, self.is_package, self.text = name, is_package, path.read_text()
        self.tree = ast.parse(self.text)
        self.defs: dict[str, Def] = {}  # qualified name ("f", "C.m", "f.inner") -> node
        self.class_of: dict[str, str] = {}  # def -> qualified name of the class it is a method of
        self.classes: set[str] = set()
        self.bindings: dict[str, Binding] = {}  # names bound by imports of package modules
        self._index(self.tree, "", "")
        self.in_def = {id(n) for d in self.defs.values() for n in ast.walk(d)}

    def _index(self, node: ast.AST, prefix: str, cls: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, ast.ClassDef):
                self.classes.add(name)
                self._index(child, name + ".", name)
            elif isinstance(child, Def):
                self.defs[name], self.class_of[name] = child, cls
                self._index(child, name + ".", "")
            else:
                self._index(child, prefix, cls)


def load(src: Path) -> dict[str, Module]:
    mods = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package and len(parts) > 1 else parts)
        mods[name] = Module(name, path, is_package)
    return mods


def resolve_import(node: ast.Import | ast.ImportFrom, m: Module, pkg: str, mods: dict[str, Module]
                   ) -> tuple[list[tuple[str, str, Binding]], list[str]]:
    """([(package module imported, name bound, binding)], [top-level names of the outside modules imported])."""
    def own(dotted: str) -> str | None:
        rel = "__init__" if dotted == pkg else dotted.removeprefix(pkg + ".") if dotted.startswith(pkg + ".") else ""
        return rel if rel in mods else None

    found, outside = [], []
    if isinstance(node, ast.Import):
        for a in node.names:
            if (target := own(a.name)) is not None:
                found.append((target, a.asname, (target, None)) if a.asname else (target, pkg, ("__init__", None)))
            elif a.name.split(".")[0] != pkg:
                outside.append(a.name.split(".")[0])
        return found, outside
    base = node.module or ""
    if node.level:
        here = [pkg] + ([] if m.name == "__init__" else m.name.split("."))
        here = (here if m.is_package else here[:-1])[:len(here) - node.level + m.is_package]
        base = ".".join(here + ([base] if base else []))
    if (target := own(base)) is None:
        return found, [] if node.level or base.split(".")[0] == pkg else [base.split(".")[0]]
    for a in node.names:
        sub, name = own(f"{base}.{a.name}"), a.asname or a.name
        found.append((sub, name, (sub, None)) if sub else (target, name, (target, a.name)))
    return found, outside


def is_params(ann: ast.expr | None) -> bool:
    text = ann.value if isinstance(ann, ast.Constant) else ast.unparse(ann) if ann else ""
    text = str(text).replace("Optional[", "").replace("]", "").replace("'", "").replace('"', "")
    return any(part.strip().split(".")[-1] == PARAMS for part in text.split("|"))


def params_vars(fn: Def) -> set[str]:
    names = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if is_params(a.annotation)}
    copies = [n for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
              and isinstance(n.value.func, ast.Attribute) and n.value.func.attr == "model_copy"
              and isinstance(n.value.func.value, ast.Name)]
    for _ in range(3):  # copies of copies
        names |= {t.id for n in copies if n.value.func.value.id in names for t in n.targets if isinstance(t, ast.Name)}
    return names


def lookup(mods: dict[str, Module], mod: str, name: str, depth: int = 0) -> str | None:
    """The def ("module:qualname") a module-level name stands for; a class gives its __init__."""
    m = mods[mod]
    if name in m.classes:
        return f"{mod}:{name}.__init__" if f"{name}.__init__" in m.defs else None
    if name in m.defs:
        return f"{mod}:{name}"
    bound = m.bindings.get(name)
    return lookup(mods, bound[0], bound[1], depth + 1) if bound and bound[1] and depth < 5 else None


def callee(mods: dict[str, Module], m: Module, qual: str, func: ast.expr) -> str | None:
    chain: list[str] = []
    while isinstance(func, ast.Attribute):
        chain.insert(0, func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    if func.id == "self" and len(chain) == 1:
        cls = m.class_of.get(qual) or m.class_of.get(qual.rsplit(".", 1)[0], "")
        return f"{m.name}:{cls}.{chain[0]}" if cls and f"{cls}.{chain[0]}" in m.defs else None
    if not chain:
        return lookup(mods, m.name, func.id)
    target, attr = m.bindings.get(func.id, ("", ""))
    while target and attr is None and len(chain) > 1 and f"{target}.{chain[0]}".removeprefix("__init__.") in mods:
        target = f"{target}.{chain.pop(0)}".removeprefix("__init__.")
    return lookup(mods, target, chain[0]) if target and attr is None and len(chain) == 1 else None


def above(a: str, b: str, ranks: dict[str, int]) -> bool:
    """Whether module b is ranked above module a."""
    def rank(mod: str) -> int | None:
        parts = mod.split(".")
        return next((ranks[".".join(parts[:i])] for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in ranks), None)
    ra, rb = rank(a), rank(b)
    return ra is not None and rb is not None and rb < ra


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module."""
    reach: dict[str, set[str]] = {}
    for v in graph:
        reach[v], todo = set(), [v]
        while todo:
            new = graph[todo.pop()] - reach[v]
            reach[v] |= new
            todo.extend(new)
    comps = {tuple(sorted(w for w in reach[v] if v in reach[w])) for v in graph if v in reach[v]}
    return [list(c) for c in sorted(comps) if len(c) > 1]


def walk(mods: dict[str, Module], ranks: dict[str, int], wide: bool) -> dict[str, Any]:
    def calls(fid: str) -> list[str]:
        mod, qual = fid.split(":")
        fn, out = mods[mod].defs[qual], []
        names = params_vars(fn)
        for call in sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)), key=lambda c: (c.lineno, c.col_offset)):
            values = list(call.args) + [k.value for k in call.keywords]
            if any(isinstance(n, ast.Name) and n.id in names for v in values for n in (ast.walk(v) if wide else [v])):
                target = callee(mods, mods[mod], qual, call.func)
                out.extend([target] if target and target != fid else [])
        return out

    def go(fid: str, chain: set[str]) -> None:
        seq.append(fid.split(":")[0])
        if fid not in graph:
            graph[fid] = calls(fid)
            for target in graph[fid]:
                if target.split(":")[0] != fid.split(":")[0]:
                    moves.add((fid, target))
                if target not in chain:
                    go(target, chain | {target})
                    seq.append(fid.split(":")[0])

    seq: list[str] = []
    graph: dict[str, list[str]] = {}
    moves: set[tuple[str, str]] = set()
    if (start := lookup(mods, "train", "run") if "train" in mods else None) is None:
        return {"rule": "values" if wide else "object", "error": "no def run in module train"}
    go(start, {start})
    switches = [(a, b) for a, b in zip(seq, seq[1:], strict=False) if a != b]
    return {"rule": "values" if wide else "object", "start": start, "defs_reached": len(graph),
            "modules_entered": sorted({f.split(":")[0] for f in graph}), "moves": len(moves),
            "moves_up": sum(above(a.split(":")[0], b.split(":")[0], ranks) for a, b in moves),
            "reading": {"moves": len(switches), "up": sum(above(a, b, ranks) for a, b in switches)},
            "edges": sorted(f"{a} -> {b}" for a, b in moves)}


def read_ranks(arg: str | None) -> dict[str, int]:
    if arg:
        return {name.strip(): i for i, name in enumerate(arg.split(",")) if name.strip()}
    test = ROOT / "tests" / "unit" / "test_structure.py"
    for node in ast.walk(ast.parse(test.read_text())) if test.exists() else []:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in targets):
            layers = ast.literal_eval(node.value)
            return {n: i for i, layer in enumerate(layers) for n in ([layer] if isinstance(layer, str) else layer)}
    return {}


def measure(src: Path, ranks: dict[str, int]) -> dict[str, Any]:
    pkg, mods = src.name, load(src)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    counts, by_module = {"module_level": 0, "in_function": 0, "type_checking": 0}, dict.fromkeys(mods, 0)
    external: dict[str, dict[str, int]] = {"stdlib": {}, "third_party": {}}
    for m in mods.values():
        guarded = {id(n) for s in ast.walk(m.tree) if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test)
                   for b in s.body for n in ast.walk(b)}
        for node in (n for n in ast.walk(m.tree) if isinstance(n, ast.Import | ast.ImportFrom)):
            found, outside = resolve_import(node, m, pkg, mods)
            where = "type_checking" if id(node) in guarded else "in_function" if id(node) in m.in_def else "module_level"
            targets = {target for target, _, _ in found}
            counts[where] += len(targets)
            by_module[m.name] += len(targets) if where == "in_function" else 0
            for _, name, binding in found:
                m.bindings.setdefault(name, binding)
            graph[m.name] |= targets - {m.name} if where != "type_checking" else set()
            for name in outside if where == "in_function" else []:
                kind = external["stdlib" if name in sys.stdlib_module_names else "third_party"]
                kind[name] = kind.get(name, 0) + 1
    takers = sorted(f"{m.name}:{q}" for m in mods.values() for q, fn in m.defs.items()
                    if any(is_params(a.annotation) for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs))
    sizes = {name: len(m.text.splitlines()) for name, m in sorted(mods.items())}
    return {
        "src": str(src), "ranks": ranks, "sizes": sizes, "largest": max(sizes, key=lambda k: sizes[k]),
        "imports": {**counts, "by_module": {k: v for k, v in by_module.items() if v},
                    "external_in_function": {k: sum(v.values()) for k, v in external.items()},
                    "external_names": external},
        "graph": {k: sorted(v) for k, v in graph.items()}, "cycles": cycles(graph),
        "upward": sorted(f"{a}->{b}" for a in graph for b in graph[a] if above(a, b, ranks)),
        "params_functions": {"count": len(takers), "files": len({t.split(":")[0] for t in takers}), "list": takers},
        "walk": walk(mods, ranks, wide=False), "walk_values": walk(mods, ranks, wide=True),
        "teacher_model_files": sorted(m.name for m in mods.values() if any(
            isinstance(n, ast.Attribute) and n.attr == "teacher_model" and isinstance(n.ctx, ast.Load)
            for n in ast.walk(m.tree))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src" / "aitraining", help="the package folder")
    parser.add_argument("--ranks", help="comma-separated module names, top first (default: LAYERS of test_structure)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "structure.json")
    args = parser.parse_args()
    ranks = read_ranks(args.ranks)
    r = measure(args.src.resolve(), ranks)
    if not ranks:
        print("no ranking (--ranks, or LAYERS in tests/unit/test_structure.py): nothing counts as up")
    imp, sizes, takers = r["imports"], r["sizes"], r["params_functions"]
    print(f"{len(sizes)} modules, {sum(sizes.values())} lines; largest {r['largest']} ({sizes[r['largest']]} lines)")
    print(f"package imports: {imp['module_level']} at module level, {imp['in_function']} in functions "
          f"({imp['type_checking']} under TYPE_CHECKING); other imports in functions: {imp['external_in_function']}")
    print(f"cycles: {r['cycles'] or 'none'}\nupward imports ({len(r['upward'])}): {', '.join(r['upward']) or 'none'}")
    print(f"{PARAMS} taken by {takers['count']} functions in {takers['files']} files")
    for w in (r["walk"], r["walk_values"]):
        print(f"walk from train.run ({w['rule']}): " + (w.get("error") or (
              f"{len(w['modules_entered'])} modules entered, {w['moves']} moves, {w['moves_up']} up; "
              f"read depth-first: {w['reading']['moves']} file switches, {w['reading']['up']} up")))
    print(f".teacher_model read in {len(r['teacher_model_files'])} files: {', '.join(r['teacher_model_files'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
