"""What a run's first screen shows besides the project's own lines, and why: the one place that says so.

Kept, as it tells the user about their run: the seed, the devices Lightning found, the model summary
(parameters, their size, the modules' mode), the progress bar and the test table.

Switched off (``quiet_lightning``; Lightning has no option for them, so a logging filter and warning
filters do it):

* Lightning's "💡 Tip" lines, which advertise its cloud logger and model registry;
* the model summary's "Precision bf16-mixed is not supported by the model summary": only its size
  estimate in MB is affected (counted at 32 bits a parameter), the parameter counts are exact;
* torch's FutureWarning that ``isinstance(treespec, LeafSpec)`` is deprecated, raised from inside
  Lightning's own code: nothing a user can act on.

Left as it is: the model summary's FLOPs column and total, which read 0. Lightning counts FLOPs only
by running the model on its ``example_input_array``, which the classifier does not set, and offers no
switch to leave the column out; the parameter counts beside it are what the summary is for.
"""

from __future__ import annotations

import logging
import warnings

TIP = "💡 Tip:"
QUIET_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Precision .* is not supported by the model summary", UserWarning),
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TIP)


_NO_TIPS = _NoTips()


def quiet_lightning() -> None:
    """Switch off what the module's docstring lists, before a trainer is made (it logs the first tip)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NO_TIPS)  # once: the same filter object
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
