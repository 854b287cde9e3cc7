"""The package's shape: imports run one way (no cycle, function-level imports included), function-level imports only
where a heavy import is deferred on purpose, the code a stage depends on found from its imports (a change to any of
them makes its results stale), and one stage graph whose inputs every driver finds produced by some stage."""
import ast
import shutil
import subprocess
import sys

import pytest

from pipeline.__main__ import STAGES
from pipeline.identity import code_digest, identity_changes, imported_modules, module_file, run_identity, stage_code
from pipeline.repo import REPO_ROOT
from pipeline.stages import stages
from pipeline.study import load_study, profiles

PACKAGE = REPO_ROOT / "pipeline"


def modules(root=REPO_ROOT) -> list[str]:
    out = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def import_graph(root=REPO_ROOT) -> dict[str, set[str]]:
    """module -> the package's modules it imports, without its own enclosing packages (a module's package is
    imported before it: not an edge a cycle can run through)."""
    return {m: {d for d in imported_modules(m, root) if not m.startswith(d + ".")} for m in modules(root)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 25 and graph["pipeline.evaluate"] >= {"pipeline.measure", "pipeline.study"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """A cycle hidden behind a function-level import, in a copy of the package, is found."""
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    measure = tmp_path / "pipeline" / "measure.py"
    measure.write_text(measure.read_text() + "\n\ndef _late():\n    from pipeline.evaluate import evaluate_run\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and "pipeline.measure" in cycle and "pipeline.evaluate" in cycle


def test_function_level_imports_are_deferred_heavy_imports_with_a_reason():
    """An import inside a function is only a deliberately deferred one of a library (never of the package), with a
    comment saying so on it or on the imports just above it."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                if getattr(node, "level", 0) or any(n.split(".")[0] == "pipeline" for n in names):
                    bad.append(f"{where}: function-level import of the package ({lines[node.lineno - 1].strip()})")
                    continue
                i = node.lineno - 1
                block = [lines[i]]
                while i > 0 and lines[i - 1].strip().startswith(("import ", "from ", "#")):
                    i -= 1
                    block.append(lines[i])
                if not any("# deferred" in line for line in block):
                    bad.append(f"{where}: function-level import without a `# deferred` reason")
    assert not bad, "\n".join(bad)


def test_stage_code_follows_imports_function_level_and_relative_ones_included(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pipeline" / "extra.py").write_text("X = 1\n")
    report = tmp_path / "pipeline" / "report.py"
    report.write_text(report.read_text() + "\n\ndef _late():\n    # deferred: a test\n    from pipeline import extra\n")
    assert "pipeline/extra.py" in stage_code("pipeline.report", tmp_path)
    assert "pipeline/extra.py" not in stage_code("pipeline.latency", tmp_path)
    # relative imports inside the models package, and the package a module lives in
    assert {"pipeline/models/riformer.py", "pipeline/models/__init__.py"} <= set(
        stage_code("pipeline.models.metaformer_v2", tmp_path))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_changing_any_module_a_stage_imports_changes_its_code_digest(stage, tmp_path):
    module = STAGES[stage][0]
    files = stage_code(module)
    assert module_file(module).relative_to(REPO_ROOT).as_posix() in files
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(module, tmp_path)
    for rel in files:
        path = tmp_path / rel
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        assert code_digest(module, tmp_path) != before, f"{stage}: a change to {rel} left its results current"
        path.write_text(original)
    assert code_digest(module, tmp_path) == before


def test_what_the_stages_call_is_part_of_their_code():
    """The modules whose functions each stage runs (the ones a hand-kept list once missed)."""
    evaluate = set(stage_code("pipeline.evaluate"))
    assert {"pipeline/measure.py", "pipeline/data.py", "pipeline/io.py", "pipeline/study.py",
            "pipeline/reparameterize.py", "pipeline/adaptive.py", "pipeline/models/adavit.py"} <= evaluate
    assert "pipeline/benchmark.py" not in evaluate  # a stage of its own: changing it does not evaluate again
    assert {"pipeline/adaptive.py", "pipeline/models/adavit.py", "pipeline/measure.py"} <= set(
        stage_code("pipeline.benchmark"))
    assert {"pipeline/data.py", "pipeline/io.py", "pipeline/measure.py"} <= set(stage_code("pipeline.reparameterize"))
    assert {"pipeline/losses.py", "pipeline/config.py", "pipeline/models/riformer.py"} <= set(
        stage_code("pipeline.train"))


def test_a_change_to_a_module_training_imports_makes_a_trained_run_stale(tmp_path, monkeypatch):
    study = load_study("smoke", check_data=False)
    cfg = study.run_config("pooling-ce")
    recorded = run_identity(cfg, "0" * 64)
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pipeline" / "measure.py").write_text((PACKAGE / "measure.py").read_text() + "\n# changed\n")
    monkeypatch.setattr("pipeline.identity.REPO_ROOT", tmp_path)
    monkeypatch.setattr("pipeline.identity.code_digest.__defaults__", ("pipeline.train", tmp_path))
    assert identity_changes(recorded, run_identity(cfg, "0" * 64)) == [
        f"training code ({recorded['code']} -> {run_identity(cfg, '0' * 64)['code']})"]


@pytest.mark.parametrize("profile", profiles())
def test_every_stage_input_under_results_is_some_stage_output(profile):
    """The one stage graph is closed: each input a stage reads from results/ is written by a stage."""
    study = load_study(profile, check_data=False)
    graph = stages(study)
    produced = {p for s in graph for p in s.each(s.outputs)}
    missing = [(s.name, p) for s in graph for p in s.each(s.deps) if p.startswith("results/") and p not in produced]
    assert not missing, missing
    names = [s.name for s in graph]
    assert len(names) == len(set(names)) and len({s.rule for s in graph}) == len(names)


def test_snakemake_has_one_rule_per_stage():
    out = subprocess.run([sys.executable, "-m", "snakemake", "--list-rules", "--config", "profile=default"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    rules = {line.strip() for line in out.splitlines() if line.strip() and " " not in line.strip()}
    assert rules == {s.rule for s in stages(load_study("default", check_data=False))} | {"all"}, out
