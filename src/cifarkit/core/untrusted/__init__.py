"""The one boundary for bytes this process did not write: images, names read from files, checkpoints and
weights files, the project's own files from earlier runs (run folders, caches, budget.json, metrics.json),
exported models, the sweep's storage. Only the modules of this package open such bytes
(tests/test_doors.py walks the source and fails on a read anywhere else); docs/trust.md lists every door
and its guard.

* ``images``: ``decode_image`` (PNG or JPEG only, bounded pixels, any decoder failure one line).
* ``text``: ``shown`` (a name made safe for a terminal), ``to_json`` (strict JSON).
* ``pickles``: ``read_cifar_pickle`` (CIFAR's python pickles, NumPy's array reconstruction the only callables).
* ``onnx_graph``: ``read_onnx`` (an exported model's graph: export.py's operators only, static bounded shapes),
  the one place an ONNX Runtime session is made.
* ``plain``: ``check_tree`` (nested data within bounds, without recursion), ``invalid`` (a pydantic
  error as a phrase), ``read_json_object``, ``inside`` (a path a file names, inside a folder).
* ``storage``: the sweep's Optuna storage (``open_storage``, ``load_study``, ``create_study``) and what it
  holds that launches jobs (``stored_round``, ``check_params``, ``check_space``); imported by name, as Optuna
  loads only in a search.
* ``tensors``: ``read_torch_file`` (every torch.save file: records against its size, ``weights_only``, plain
  data bounds), ``read_weights_file``, ``read_image_cache``, ``plain_tensor``.
* ``budget_file``: ``read_budget`` (a run folder's budget.json: its schema, and steps within what the
  resumed run's ``budget_s`` could buy).
* ``keys``, ``sizes``, ``digest``: serve.py's API key file, an upload's header weighed before its decode, the
  model file hashed for its identity.

Lightning-free; torch is imported only by the readers that need it.
"""

from cifarkit.core.untrusted.images import DECODER, MAX_MEGAPIXELS, ImageTooLarge, decode_image
from cifarkit.core.untrusted.pickles import read_cifar_pickle
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
    "read_cifar_pickle",
    "read_json_object",
    "shown",
    "to_json",
]
