"""What the client commands and the local-stack commands share: where the stack keeps its state.

`client` (REST commands) and `stack` (up/down/demo) both read the stack's state file; keeping it here
lets `stack` use the client (demo submits and watches) without the client importing `stack`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_FILE = "stack.json"


def stack_data_dir(value: str | None) -> Path:
    from service.settings import default_data_dir

    raw = value or os.environ.get("CONVTUNE_DATA_DIR")
    return (Path(raw) if raw else default_data_dir()).expanduser().resolve()


def read_state(data_dir: Path) -> dict | None:
    path = data_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
