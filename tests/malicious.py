"""A pickle payload for the tests that prove nothing is unpickled (train/test_checkpoint_safety.py,
cli/test_train_cli.py)."""

import os
from pathlib import Path


class Touch:
    """Unpickling this calls `action(marker)`: what a crafted checkpoint would do instead of touching a file."""

    def __init__(self, marker: Path, action: str) -> None:
        self.marker, self.action = marker, action

    def __reduce__(self):
        if self.action == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return Path.touch, (self.marker,)
