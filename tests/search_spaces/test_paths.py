"""Paths in a spec stay inside the data roots, on the service and again on the Ray node (the driver)."""

from __future__ import annotations

import pytest

from search_spaces.driver import main as driver_main
from search_spaces.paths import check_path, path_errors


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "data"
    (root / "flowers").mkdir(parents=True)
    outside = tmp_path / "secret-place"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    return root, outside


def test_inside_outside_and_symlinks(roots):
    root, outside = roots
    assert check_path(str(root / "flowers"), [root]) is None
    assert "outside" in check_path(str(outside), [root])
    reason = check_path(str(root / "link" / "x.pth"), [root])
    assert reason and "links outside" in reason
    assert str(outside) not in reason  # never where the link points


def test_a_file_that_does_not_exist_yet_is_judged_by_its_folder(roots):
    root, outside = roots
    assert check_path(str(root / "flowers" / "new" / "ckpt.pth"), [root]) is None
    reason = check_path(str(outside / "new" / "ckpt.pth"), [root])
    assert reason and "outside" in reason


def test_every_path_of_a_spec_is_named_by_field(roots):
    root, outside = roots
    spec = {"base": {"data_root": str(outside)},
            "space": {"checkpoint": {"type": "choice", "values": [str(root / "flowers" / "a.pth"), "relative.pth"]}}}
    errors = path_errors(spec, [root])
    assert [e["field"] for e in errors] == ["base.data_root", "space.checkpoint.values.1"]


def test_the_driver_checks_paths_again_on_the_node_before_starting_ray(roots, tmp_path, monkeypatch, capsys):
    root, outside = roots
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "p", "base": {"model": "convnextv2_atto", "dataset": "imagefolder", "num_classes": 2, '
                    f'"data_root": "{outside}"}}, "space": {{"blr": {{"type": "loguniform", "low": 1e-4, '
                    '"high": 1e-2}}}')
    monkeypatch.setenv("CONVTUNE_DATA_ROOTS", str(root))
    code = driver_main(["--spec", str(spec), "--sweep-id", "p", "--storage-path", str(tmp_path / "rr"),
                        "--mlflow-uri", "http://127.0.0.1:9"])
    assert code != 0
    err = capsys.readouterr().err
    assert "base.data_root" in err and "outside the allowed data roots" in err
