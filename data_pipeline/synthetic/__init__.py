"""The built-in synthetic face data set: parameters (:mod:`.params`), drawing (:mod:`.render`),
the data set itself (:mod:`.faces`) and writing it out as shards (:mod:`.dataset`).

Not the random-tensor loader (``data.loader=random_tensors``), which makes no images at all.
"""
from .faces import DEFAULT_DIFFICULTY, SynthConfig, SyntheticFaces, encode_jpeg, heldout_faces, render_jpegs

__all__ = ["DEFAULT_DIFFICULTY", "SynthConfig", "SyntheticFaces", "encode_jpeg", "heldout_faces", "render_jpegs"]
