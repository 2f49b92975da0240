"""The house rules of the package, read from its source: imports point down the layers below, none hides inside a
function, the teacher is reached through its package's interface, only the entry points read the whole parameters
object, and every module names its one concern in its first docstring line and stays small.

A new module goes into LAYERS where it belongs: below everything that imports it, above everything it imports.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from aitraining.batches import StudentSettings
from aitraining.data.examples import DataSettings
from aitraining.loop import LoopSettings
from aitraining.params import LLMTrainingParams
from aitraining.runfolder import FolderSettings
from aitraining.teacher import TeacherSettings

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "aitraining"

# Top first. A module may import only modules of a lower layer (of another line further down).
LAYERS: list[list[str]] = [
    ["cli"],
    ["project"],
    ["train"],
    ["evaluate", "compare"],
    ["loop"],
    ["onpolicy", "judge"],
    ["metrics"],
    ["objective", "card", "plots", "runfolder", "hardware"],
    ["batches"],
    ["teacher"],
    ["teacher.sources"],
    ["teacher.phase"],
    ["teacher.engine", "teacher.server"],
    ["teacher.text", "teacher.cache", "teacher.path"],
    ["teacher.settings"],
    ["models.prune", "models.transplant"],
    ["models.choose", "models.folders"],
    ["models.generate", "models.load", "models.lora", "models.layers"],
    ["models.gguf"],
    ["models.rebuild"],
    ["models.heads"],
    ["models"],
    ["data.templates"],
    ["data.examples"],
    ["data.files"],
    ["data"],
    ["align"],
    ["chunked"],
    ["closed_form"],
    ["losses"],
    ["signal"],
    ["padding"],
    ["params"],
    ["errors", "heap"],
    [""],  # the package's own __init__
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
ENTRY_POINTS = {"cli", "project", "train", "params"}  # the only modules that read LLMTrainingParams
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The package modules an import statement names (relative to the package, "" for the package itself)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        assert not node.level, f"{module} line {node.lineno}: a relative import; the package imports absolutely"
        names = [node.module or ""]
        names += [f"{node.module}.{a.name}" for a in node.names]  # `from aitraining import x` names module x
    out = []
    for name in names:
        if name == "aitraining" or name.startswith("aitraining."):
            rel = name.removeprefix("aitraining").removeprefix(".")
            while rel and rel not in MODULES:  # an attribute of a module, not a module
                rel = rel.rpartition(".")[0]
            out.append(rel)
    return sorted(set(out))


def imports_of(module: str) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, and whether it sits inside a function."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(MODULES) - set(RANK))
    assert not missing, f"modules without a place in LAYERS (tests/unit/test_structure.py): {missing}"
    gone = sorted(set(RANK) - set(MODULES))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = []
    for node, _ in imports_of(module):
        for target in imported(node, module):
            if target != module and RANK.get(target, -1) <= RANK[module]:
                upward.append(f"{module} (layer {RANK[module]}) imports {target or 'aitraining'} "
                              f"(layer {RANK.get(target)}), line {node.lineno}")
    assert not upward, "imports must point down the layers: " + "; ".join(upward)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "cli"))
def test_no_import_hides_in_a_function(module: str) -> None:
    """Outside the command line (which loads each command's code when it runs), an import inside a function is
    only an optional or one-feature dependency loaded lazily, and says so on its line ("# lazy: why")."""
    lines = MODULES[module].read_text(encoding="utf-8").splitlines()
    hidden = []
    for node, in_function in imports_of(module):
        if not in_function:
            continue
        if imported(node, module):
            hidden.append(f"line {node.lineno}: an import of the package's own code inside a function")
        elif "# lazy:" not in lines[node.lineno - 1]:
            hidden.append(f"line {node.lineno}: an import inside a function without '# lazy: <why>'")
    assert not hidden, f"{module}: " + "; ".join(hidden)


def test_the_teacher_is_reached_through_its_interface() -> None:
    """Outside teacher/, only `aitraining.teacher` (open_source, TeacherSource, TeacherSettings, ...) is imported."""
    inside = []
    for module in MODULES:
        if module == "teacher" or module.startswith("teacher."):
            continue
        for node, _ in imports_of(module):
            inside += [f"{module} imports {t}" for t in imported(node, module) if t.startswith("teacher.")]
    assert not inside, inside


def test_training_never_loads_pruning_or_transplants() -> None:
    seen, todo = set(), ["train"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [t for node, in_function in imports_of(module) if not in_function for t in imported(node, module)]
    assert not seen & {"models.prune", "models.transplant", "models.choose"}, sorted(seen)


def test_only_the_entry_points_read_the_parameters_object() -> None:
    def reads(module: str) -> bool:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        return any((isinstance(n, ast.Name) and n.id == "LLMTrainingParams")
                   or (isinstance(n, ast.alias) and n.name == "LLMTrainingParams") for n in ast.walk(tree))

    readers = sorted(m for m in MODULES if reads(m))
    assert set(readers) <= ENTRY_POINTS, f"only {sorted(ENTRY_POINTS)} may read LLMTrainingParams; also: " \
                                         f"{sorted(set(readers) - ENTRY_POINTS)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_names_its_concern_and_stays_small(module: str) -> None:
    source = MODULES[module].read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source))
    assert doc and doc.strip(), f"{module}: its first docstring line must name its concern"
    assert len(source.splitlines()) <= MAX_LINES, f"{module}: {len(source.splitlines())} lines; split it by concern"


def test_settings_defaults_are_the_documented_ones() -> None:
    """Each stage's settings (a dataclass named as the parameters it holds) defaults to what LLMTrainingParams
    documents, so that a stage called without a run (a benchmark, `aitraining prune --calibration-data`) reads data
    and models as a run would."""
    fields = LLMTrainingParams.model_fields
    wrong = []
    for cls in (DataSettings, StudentSettings, TeacherSettings, LoopSettings, FolderSettings):
        for f in dataclasses.fields(cls):
            if f.name in fields and f.default is not dataclasses.MISSING and f.default != fields[f.name].default:
                wrong.append(f"{cls.__name__}.{f.name} = {f.default!r}, documented {fields[f.name].default!r}")
    assert not wrong, wrong
