"""The tree is the architecture: imports flow cli.py -> pipeline -> broker, and workers -> both.

Every module's imports (function-level ones included) are read with `ast`, so a later change
cannot quietly bring back a cycle, a job kind that reaches into another kind, or math that
talks to Redis.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "pipeline", "workers")
KINDS = ("fpld", "rag", "smalltalk")
MAX_LINES = 400
# Pure functions on arrays and the model layer: no fleet, no Redis, no wire.
BROKER_FREE = ("pipeline/models/", "pipeline/data.py", "pipeline/seeds.py", "pipeline/files.py", "pipeline/job_config.py",
               "pipeline/aggregate.py", "pipeline/rag/conformal.py", "pipeline/rag/retrieval.py",
               "pipeline/smalltalk/routing.py", "pipeline/smalltalk/balanced_assignment.py",
               "pipeline/smalltalk/eval.py", "pipeline/report/team_metrics.py", "pipeline/report/plots.py",
               "pipeline/report/html.py")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for cli.py and every module of the three packages."""
    found = {"cli": root / "cli.py"} if (root / "cli.py").exists() else {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports: `from a.b import c` counts a.b.c where c is a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m.split(".")[0] in (*PACKAGES, "cli")}


def kind_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" and parts[1] in KINDS else None


def violations(root: Path) -> list[str]:
    """Every broken rule, one line each (empty when the tree is clean)."""
    mods = modules(root)
    known = set(mods)
    bad = []
    for name, path in mods.items():
        rel = path.relative_to(root).as_posix()
        top = name.split(".")[0]
        for dep in sorted(imported(path, known)):
            dtop = dep.split(".")[0]
            if top == "broker" and dtop != "broker":
                bad.append(f"{rel}: broker/ imports {dep} (broker is the bottom layer)")
            if dtop == "workers" and top != "workers":
                bad.append(f"{rel}: imports {dep} (only Celery loads workers/, by name)")
            if dtop == "cli" and top != "cli":
                bad.append(f"{rel}: imports cli (cli.py only assembles commands)")
            if top == "pipeline" and dtop == "pipeline":
                mine, theirs = kind_of(name), kind_of(dep)
                if theirs is not None and theirs != mine:
                    where = f"job kind {mine}" if mine else "shared pipeline code"
                    bad.append(f"{rel}: {where} imports {dep} of job kind {theirs} (move shared code down)")
            if dtop == "broker" and any(rel.startswith(p) for p in BROKER_FREE):
                bad.append(f"{rel}: math/model module imports {dep} (keep it pure)")
        lines = len(path.read_text().splitlines())
        if top in PACKAGES and lines > MAX_LINES:
            bad.append(f"{rel}: {lines} lines, over {MAX_LINES}")
    return bad


def test_the_tree_keeps_its_layers():
    assert violations(ROOT) == []


@pytest.mark.parametrize("module, source, rule", [
    ("broker/store.py", "from pipeline.data import windows\n", "broker is the bottom layer"),
    ("pipeline/report/status.py", "from workers.base import store\n", "only Celery loads workers/"),
    ("pipeline/rag/steps.py", "def f():\n    from pipeline.fpld.steps import node_round\n", "job kind fpld"),
    ("pipeline/data.py", "from pipeline.smalltalk import routing\n", "shared pipeline code imports"),
    ("pipeline/models/gpt.py", "import broker.store\n", "keep it pure"),
    ("workers/fpld.py", "x = 1\n" * (MAX_LINES + 1), "over 400"),
])
def test_each_rule_catches_its_violation(tmp_path, module, source, rule):
    """The checker itself: a tree with one planted violation fails with that rule's line."""
    for pkg in (*PACKAGES, "pipeline/models", "pipeline/report", "pipeline/rag", "pipeline/fpld", "pipeline/smalltalk"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for rel in ("pipeline/fpld/steps.py", "pipeline/smalltalk/routing.py", "broker/store.py", "workers/base.py",
                "pipeline/data.py"):
        (tmp_path / rel).write_text("")
    (tmp_path / module).write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and rule in found[0], found


def test_celery_loads_every_task_module_by_name_and_routes_every_task():
    from broker import keys
    from broker.app import TASK_MODULES, app

    mods = modules(ROOT)
    assert all(m in mods for m in TASK_MODULES)
    app.loader.import_default_modules()
    names = {getattr(keys, k) for k in dir(keys) if k.endswith("_TASK")}
    assert names <= set(app.tasks), names - set(app.tasks)
    assert names == set(keys.STATIC_ROUTES) | keys.NODE_TASKS | keys.EXPERT_TASKS  # no task goes unrouted


def test_an_undeclared_queue_is_an_error_not_a_new_queue():
    from celery.exceptions import QueueNotFound

    from broker.app import client_app
    from broker.settings import FleetSettings

    app = client_app(FleetSettings(broker_url="redis://127.0.0.1:1/0"))
    with pytest.raises(QueueNotFound):
        app.amqp.router.route({"queue": "aggregatr"}, "lmteam.fpld.aggregate_round", (), {})
    route = app.amqp.router.route({}, "lmteam.fpld.node_round", ("job", 0, "3"), {})
    assert route["queue"].name == "node.3"
    assert app.amqp.router.route({}, "lmteam.smalltalk.score", ("job", 0, 1), {})["queue"].name == "aggregator"


def test_an_installed_package_carries_every_subpackage():
    """pip install . (the Dockerfile) must ship broker.wire, pipeline.fpld, ... not only the top level."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(ROOT), include=find["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert on_disk <= shipped, on_disk - shipped
