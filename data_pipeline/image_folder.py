"""A ``SampleSource`` over an image folder laid out as ``root/<identity>/<image>``."""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from .bad_data import pil_message
from .progress import Progress

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                              ".ppm", ".pgm"})
JPEG_QUALITY = 95


class BadImageError(ValueError):
    """An image file that cannot be read as an image."""


def _is_image(path: Path, root: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return path.is_file() and not hidden and path.suffix.lower() in IMAGE_EXTENSIONS


def load_as_jpeg(path: Path) -> bytes:
    """The file's bytes if it is an RGB JPEG (byte for byte), else the image re-encoded as RGB JPEG."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            # load() decodes everything: a truncated file fails here, not in the training loader.
            im.load()
            if im.format == "JPEG" and im.mode == "RGB":
                return data
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {pil_message(e)} (delete or "
                            "replace the file, or convert with --skip-bad (skip_bad=True in Python) to skip "
                            "unreadable images)") from e
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class ImageFolderSource:
    """Images under ``root/<identity>/``; identities sorted by name get labels ``0..C-1``.

    Images in sub-folders of ``root/<identity>/`` belong to that identity (the folder is
    read recursively; hidden files and folders are left out).  JPEGs are passed through byte
    for byte; other formats (PNG, ...) and non-RGB JPEGs are
    re-encoded as RGB JPEG at quality 95. Identity folders without images get no label.
    With ``skip_bad=True`` every image is decoded once up front and unreadable ones are
    left out (listed in ``skipped``); otherwise reading one raises ``BadImageError``.
    """

    def __init__(self, root: str | os.PathLike, skip_bad: bool = False, progress: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.name = f"folder:{self.root.resolve()}"
        loose = [p.name for p in self.root.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            raise ValueError(f"{self.root} holds images directly ({loose[0]}, ...): expected "
                             "root/<identity>/<image>, one folder per identity")
        self.identities: list[str] = []
        self.paths: list[Path] = []
        self.labels: list[int] = []
        for ident in sorted(p.name for p in self.root.iterdir()
                            if p.is_dir() and not p.name.startswith(".")):
            # Images in sub-folders of an identity (root/<id>/<session>/<image>) are that
            # identity's too: taken recursively rather than dropped unseen.
            folder = self.root / ident
            images = sorted(p for p in folder.rglob("*") if _is_image(p, folder))
            if not images:
                continue
            label = len(self.identities)
            self.identities.append(ident)
            self.paths += images
            self.labels += [label] * len(images)
        if not self.paths:
            raise ValueError(f"no images found under {self.root}: expected root/<identity>/<image> "
                             f"with extensions {sorted(IMAGE_EXTENSIONS)}")
        self.num_classes = len(self.identities)
        self.skipped: list[tuple[Path, str]] = []
        if skip_bad:
            self._drop_unreadable(progress)

    def _drop_unreadable(self, progress: bool) -> None:
        bar = Progress(f"checking images in {self.root.name}", len(self.paths), enabled=progress)
        keep = []
        for k, path in enumerate(self.paths):
            try:
                load_as_jpeg(path)
                keep.append(k)
            except BadImageError as e:
                self.skipped.append((path, str(e.__cause__)))
            bar.update()
        bar.close(note=f"{len(self.skipped)} unreadable skipped")
        self.paths = [self.paths[k] for k in keep]
        self.labels = [self.labels[k] for k in keep]
        # Labels stay those of the identity folders, so a folder whose images were all
        # unreadable keeps its label unused rather than shifting every later identity.
        if not self.paths:
            raise ValueError(f"every image under {self.root} is unreadable")

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, i: int) -> str:
        """The file of sample ``i`` (named in conversion errors)."""
        return str(self.paths[i])

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return load_as_jpeg(self.paths[i]), self.labels[i]
