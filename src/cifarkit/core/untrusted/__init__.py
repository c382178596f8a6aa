"""The one boundary for bytes this process did not write: images, names read from files, checkpoints and
weights files, the project's own files from earlier runs (run folders, caches, budget.json, metrics.json),
exported models, the sweep's storage. Only the modules of this package open such bytes
(tests/test_doors.py walks the source and fails on a read anywhere else); docs/trust.md lists every door
and its guard.

* ``images``: ``decode_image`` (PNG or JPEG only, bounded pixels, any decoder failure one line).
* ``text``: ``shown`` (a name made safe for a terminal), ``to_json`` (strict JSON).
* ``plain``: ``check_tree`` (nested data within bounds, without recursion), ``invalid`` (a pydantic
  error as a phrase), ``read_json_object``, ``inside`` (a path a file names, inside a folder).
* ``budget_file``: ``read_budget`` (a run folder's budget.json: its schema, and steps within what the
  resumed run's ``budget_s`` could buy).

Lightning-free; torch is imported only by the readers that need it.
"""

from cifarkit.core.untrusted.images import DECODER, MAX_MEGAPIXELS, ImageTooLarge, decode_image
from cifarkit.core.untrusted.plain import check_tree, inside, invalid, read_json_object
from cifarkit.core.untrusted.text import shown, to_json

__all__ = [
    "DECODER",
    "MAX_MEGAPIXELS",
    "ImageTooLarge",
    "check_tree",
    "decode_image",
    "inside",
    "invalid",
    "read_json_object",
    "shown",
    "to_json",
]
