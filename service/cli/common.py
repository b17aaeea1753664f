"""What the CLI's client, stack and live-view modules share: the stack's state file, API errors.

Imports point one way: `stack` (up/down/demo) -> `client` (REST commands) -> `live` (the watch view)
-> `common`; the client finds the local stack's API through the state file here, not through `stack`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_FILE = "stack.json"


class ApiError(RuntimeError):
    """A failed API call, as the one message the CLI prints."""


def stack_data_dir(value: str | None) -> Path:
    from service.settings import default_data_dir

    raw = value or os.environ.get("CONVTUNE_DATA_DIR")
    return (Path(raw) if raw else default_data_dir()).expanduser().resolve()


def read_state(data_dir: Path) -> dict | None:
    path = data_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def error_message(resp) -> str:
    """An error response (read) as one line, plus one line per invalid field."""
    try:
        body = resp.json()
        detail = body.get("detail", resp.text)
        errors = body.get("errors") or []
    except ValueError:
        detail, errors = resp.text, []
    lines = [f"HTTP {resp.status_code}: {detail}"] if not errors else [f"HTTP {resp.status_code}:"]
    lines += [f"  {e['field']}: {e['reason']}" for e in errors]
    return "\n".join(lines)
