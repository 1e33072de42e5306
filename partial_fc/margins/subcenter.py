"""Sub-center ArcFace: K centres per class, ArcFace on the closest one."""
from __future__ import annotations

from .arcface import ArcFace
from .base import require


class SubCenterArcFace(ArcFace):
    """ArcFace on cos θ_j = max_k cos(x, w_{j,k}) over the K sub-centres of class j.

    Deng, Guo, Liu, Gong, Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces", ECCV 2020 (K = 3, s = 64, m = 0.5).  The classifier
    stores K rows per class (``num_centers``) and passes the max cosine over them, so noisy
    samples can gather around a non-dominant centre instead of pulling the main one.
    """

    name = "subcenter_arcface"
    paper = ("Deng et al., Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy "
             "Web Faces, ECCV 2020")

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, k: int = 3) -> None:
        super().__init__(s=s, m=m, easy_margin=easy_margin)
        if isinstance(k, float) and float(k).is_integer():
            k = int(k)  # configuration files may spell 3 as 3.0
        require(isinstance(k, int) and not isinstance(k, bool) and k >= 1,
                f"subcenter_arcface k={k!r} must be an integer >= 1 (sub-centres per class, 3 in the paper)")
        self.k = k

    @property
    def num_centers(self) -> int:  # type: ignore[override]
        """Rows per class: K."""
        return self.k
