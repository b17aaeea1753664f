"""Client rendering of one sweep and the CLI modules' import direction."""

from __future__ import annotations

import subprocess
import sys

from service.cli.client import render_detail
from service.cli.live import detail_best


def detail(**extra) -> dict:
    logged = {f"setting_{i}": str(i) for i in range(70)}  # the loop logs every finetune setting to the run
    logged.update(blr="0.004", layer_decay="0.9", resolved_lr="0.0005", mlflow="{}")
    return {"id": "sw-1", "name": "tiny", "status": "SUCCEEDED", "attempt": 1, "metric": "val_top1",
            "progress": None, "links": {"mlflow": "http://m/#/experiments/1/runs/r", "ray": "http://r"},
            "spec": {"space": {"blr": {}, "layer_decay": {}}},
            "best_trial": {"trial_id": "t2", "metrics": {"val_top1": 91.25}, "params": logged}, **extra}


def test_best_trial_shows_searched_params_and_resolved_lr_only():
    assert detail_best(detail()) == {"trial_id": "t2", "metric": "val_top1", "value": 91.25,
                                     "params": {"blr": 0.004, "layer_decay": 0.9}, "lr": 0.0005}
    text = render_detail(detail())
    assert "  best: t2  val_top1=91.25  lr=0.0005  blr=0.004  layer_decay=0.9" in text.splitlines()
    assert "setting_" not in text and "registered model" not in text


def test_detail_shows_the_registered_model_version():
    text = render_detail(detail(model_version="3"))
    assert "  registered model version: 3 (`convtune export sw-1`)" in text.splitlines()


def test_client_does_not_import_the_stack_module():
    code = ("import sys; import service.cli.client as c, service.cli.live, service.cli.export; c.default_api_url(); "
            "print('service.cli.stack' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "CONVTUNE_DATA_DIR": "/nonexistent-convtune"})
    assert out.stdout.strip() == "False"


def _cli_imports() -> dict[str, set[str]]:
    """Every service.cli module -> the service.cli modules it imports anywhere (top level or in a function)."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "service" / "cli"
    graph = {}
    for path in folder.glob("*.py"):
        name = "service.cli" if path.stem == "__init__" else f"service.cli.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = ".".join(["service", "cli", *filter(None, [base])])
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m.startswith("service.cli.") and m != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_client_and_stack_do_not_import_each_other_even_through_a_cycle():
    """Statically, so an import inside a function counts too: client never reaches stack by any path, and no
    service.cli module reaches itself."""
    graph = _cli_imports()
    assert {"service.cli.client", "service.cli.stack", "service.cli.common"} <= set(graph)
    assert "service.cli.client" in graph["service.cli.stack"]  # the one allowed direction
    assert "service.cli.stack" not in _reachable(graph, "service.cli.client")
    cycles = [m for m in graph if m in _reachable(graph, m)]
    assert not cycles, f"import cycles through {cycles}"
