"""Data for face training, in the order it flows:

``storage`` (local and remote bytes) → ``formats`` (tar, manifest, RecordIO, JPEG, ``.bin``)
→ ``sources`` (shard sets, image folders, ``.rec`` data sets) → ``loaders`` (batches for the
trainer). ``synthetic`` is the built-in face data set; ``convert``, ``inspect`` and
``augment_figure`` are command-line tools; ``bad_data`` and ``progress`` are shared by all.

The modules used to sit flat in this package. Their old dotted names (``data_pipeline.wds_loader``,
``data_pipeline.manifest``, ...) still import: :data:`MOVED` maps each to its new home, and the
finder below hands back the very same module object, so attributes patched through either name
are seen through both, and pickles that name an old module still load.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

MOVED: dict[str, str] = {
    "byte_streams": "storage.byte_streams",
    "remote_writes": "storage.remote_writes",
    "atomic": "storage.atomic",
    "tar_members": "formats.tar_members",
    "tar_reader": "formats.tar_reader",
    "tar_writer": "formats.tar_writer",
    "recordio": "formats.recordio",
    "jpeg": "formats.jpeg",
    "decode": "formats.decode",
    "verification": "formats.verification",
    "manifest": "formats.manifest",
    "file_kind": "formats.file_kind",
    "shards": "sources.shards",
    "shard_cache": "sources.shard_cache",
    "remote_output": "sources.remote_output",
    "image_folder": "sources.image_folder",
    "rec_dataset": "sources.rec_dataset",
    "kinds": "loaders.kinds",
    "loader_base": "loaders.loader_base",
    "epoch_plan": "loaders.epoch_plan",
    "sample_streams": "loaders.sample_streams",
    "augment": "loaders.augment",
    "dali_augment": "loaders.dali_augment",
    "wds_loader": "loaders.wds_loader",
    "dali_index": "loaders.dali_index",
    "dali_loader": "loaders.dali_loader",
    "rec_loader": "loaders.rec_loader",
    "rec_dali_loader": "loaders.rec_dali_loader",
    "tensor_loader": "loaders.tensor_loader",
    "synthetic_params": "synthetic.params",
    "synthetic_render": "synthetic.render",
    "synthetic_dataset": "synthetic.dataset",
}
"""Old module name (directly under ``data_pipeline``) → its path now, relative to ``data_pipeline``.
``data_pipeline.loaders`` and ``data_pipeline.synthetic`` were modules and are now packages that
export the same names, so they need no entry."""


class _AliasSpec(importlib.machinery.ModuleSpec):
    """The spec of an old name; its ``parent`` is the new module's package, so that the relative
    imports of a module run under the old name (``python -m data_pipeline.<old>``) resolve."""

    @property
    def parent(self):
        return f"{__name__}.{MOVED[self.name.rpartition('.')[2]]}".rpartition(".")[0]


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``data_pipeline.<old>`` to the module now at ``data_pipeline.<new>``."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != __name__ or old not in MOVED:
            return None
        # origin: the new file, which runpy gives as __file__ and sys.argv[0] to a module run as main.
        return _AliasSpec(fullname, self, origin=importlib.util.find_spec(f"{__name__}.{MOVED[old]}").origin)

    def create_module(self, spec):
        # The import system stores whatever this returns under the old name in sys.modules.
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its new name; the import system overwrote __spec__ with the
        # alias spec just before this call, so put the module's own back (reload, pickle, runpy).
        if isinstance(module.__spec__, _AliasSpec):
            module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname):
        # `python -m data_pipeline.<old>` (runpy) runs the new module's code.
        new = importlib.util.find_spec(f"{__name__}.{MOVED[fullname.rpartition('.')[2]]}")
        return new.loader.get_code(new.name)

    def is_package(self, fullname):
        return False


# First in line: an older checkout installed in editable mode would otherwise answer for the old
# names with its own flat files, giving a second, different module.
if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
