"""Messages from libraries that say nothing to our users, filtered in one place.

Each filter names the library line it silences and why it is noise for a shardface user.
Our own warnings are never filtered here: a warning of ours that is noise gets fixed where
it is raised.  ``quiet_libraries()`` is called at the start of every process (``shardface``
and ``train.main``); ``SHARDFACE_VERBOSE=1`` keeps every library message.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # DeepSpeed's ZeRO still calls the old collective name; ours use all_gather_single.
    (FutureWarning, r".*all_gather_into_tensor.* is deprecated", "deepspeed"),
    # torch compares loader workers with the cores it sees; data.workers is the user's setting
    # and the start-up lines show it (under torchrun every rank sees all cores).
    (UserWarning, r"This DataLoader will create \d+ worker processes in total", "torch.utils.data"),
)
"""(category, message pattern, module that warns) of the warnings silenced."""

LOG_LINES: dict[str, tuple[str, ...]] = {
    "DeepSpeed": (
        r"Setting ds_accelerator to",  # the accelerator it found by itself: the start-up line names the device
        r"Setting accelerator to CPU",  # the same on a machine without GPU (as a warning)
        # Our SGD/AdamW under ZeRO are trained in tests/test_trainer.py; the generated config allows them.
        r"untested optimizer",
    ),
}
"""Logger name → patterns of the log records dropped."""

_installed = False


class _DropLines(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries() -> None:
    """Install the filters above (once per process)."""
    global _installed
    if _installed or os.environ.get("SHARDFACE_VERBOSE") == "1":
        return
    _installed = True
    for category, message, _module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, patterns in LOG_LINES.items():
        logging.getLogger(name).addFilter(_DropLines(patterns))
