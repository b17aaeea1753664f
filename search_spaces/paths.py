"""Filesystem paths in a spec: every one must lie inside the allowed data roots.

The service checks a spec's paths when it is submitted; the sweep driver checks them again on the Ray
node that runs it (``CONVTUNE_DATA_ROOTS``, passed by the service), since that is where they are read
and where symlinks resolve. Messages name the field and the path as written, never where a symlink
points, so errors do not reveal the filesystem behind the roots.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Keys whose string values are filesystem paths a trial reads.
PATH_KEYS = frozenset({"data_root", "data_path", "data_dir", "checkpoint", "pretrained_checkpoint",
                       "finetune", "init_checkpoint", "resume_from"})
#: Environment variable through which the service hands its data roots to the sweep driver.
ROOTS_ENV = "CONVTUNE_DATA_ROOTS"


def spec_paths(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(field, path string) for every value under a PATH_KEYS key: base values, lists and searched values."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{prefix}.{key}" if prefix else str(key)
            if key in PATH_KEYS:
                yield from _path_values(item, where)
            else:
                yield from spec_paths(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from spec_paths(item, f"{prefix}.{i}")


def _path_values(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _path_values(item, f"{where}.{i}")
    elif isinstance(value, dict):  # a searched path: {type: choice, values: [...]}
        yield from _path_values(value.get("values"), f"{where}.values")


def check_path(raw: str, roots: list[Path]) -> str | None:
    """Why ``raw`` is not allowed, or None. Symlinks are resolved before the containment check; a path that
    does not exist yet (an output) needs its nearest existing parent inside a root."""
    if "\x00" in raw:
        return "contains a NUL byte"
    if raw.startswith(("s3://", "gs://", "http://", "https://", "file:")):
        return "only local paths inside the allowed data roots are accepted"
    if ".." in Path(raw).parts:
        return "must not contain '..'"
    path = Path(os.path.expanduser(raw)) if raw.startswith("~") else Path(raw)
    listed = ", ".join(map(str, roots))
    if not path.is_absolute():
        return f"must be an absolute path inside the allowed data roots ({listed})"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # judge a future file by the folder it would be created in
    resolved = existing.resolve()  # follows symlinks, so a link pointing outside is caught here
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        via = "" if existing == path else f" (its folder {existing} is)"
        return (f"is outside the allowed data roots ({listed}){via}, or links outside them; move the data under "
                f"a root or add one to {ROOTS_ENV}")
    return None


def path_errors(data: Any, roots: list[Path]) -> list[dict[str, str]]:
    """``{"field", "message"}`` for every path in ``data`` that is not allowed."""
    return [{"field": where, "message": f"{raw!r} {reason}"} for where, raw in spec_paths(data)
            if (reason := check_path(raw, roots))]


def roots_from_env() -> list[Path] | None:
    """The data roots the service handed to this process, resolved; None when it handed none."""
    value = os.environ.get(ROOTS_ENV)
    if not value:
        return None
    return [Path(p.strip()).expanduser().resolve() for p in value.replace(";", ",").split(",") if p.strip()]
