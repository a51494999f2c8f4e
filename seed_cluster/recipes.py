"""Augmentation recipes: the crop ranges and photometric probabilities of each method's views, with sources.

A `Recipe` says what a view's random choices are drawn from; `seed_cluster.view_keys` draws them from the
view's key, and `seed_cluster.augment` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from seed_cluster.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """One augmentation recipe; ranges and probabilities as torchvision's transforms take them."""

    scale: tuple[float, float]
    """RandomResizedCrop area fraction range of the source image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio (w/h) range, sampled log-uniformly."""
    p_flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """ColorJitter strengths (brightness, contrast, saturation, hue)."""
    p_jitter: float = 0.8
    p_gray: float = 0.2
    gray_before_jitter: bool = False
    """MoCo v1 applies RandomGrayscale before ColorJitter."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range, in output pixels."""
    p_blur: float = 0.0
    blur_kernel_frac: float = 0.1
    """Blur kernel size as a fraction of the output size (SimCLR: 10%), made odd, at least 3."""
    p_solarize: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            problems.append(f"scale={self.scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio={self.ratio} must satisfy 0 < lo <= hi")
        for name in ("p_flip", "p_jitter", "p_gray", "p_blur", "p_solarize"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            problems.append(f"jitter={self.jitter} must be >= 0, hue <= 0.5")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma={self.blur_sigma} must satisfy 0 < lo <= hi")
        if problems:
            raise ConfigError("invalid augmentation recipe: " + "; ".join(problems))


_SIMCLR_COLOR = dict(jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_gray=0.2)  # color distortion s = 1
RECIPES: dict[str, Recipe] = {
    # MoCo v2 (Chen et al. 2020, arXiv 2003.04297), facebookresearch/moco main_moco.py `aug_plus`:
    # RandomResizedCrop(224, scale=(0.2, 1.)), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    # RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5), RandomHorizontalFlip().
    # SEED (Fang et al. 2021) trains with this recipe.
    "mocov2": Recipe(scale=(0.2, 1.0), p_blur=0.5),
    # MoCo v1 (He et al. 2020, arXiv 1911.05722), same file without `aug_plus`:
    # RandomResizedCrop(224, scale=(0.2, 1.)), RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)
    # (always applied, after the grayscale), RandomHorizontalFlip(); no blur.
    "mocov1": Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, gray_before_jitter=True),
    # SimCLR (Chen et al. 2020, arXiv 2002.05709) appendix A: crop area 0.08-1, aspect 3/4-4/3, flip,
    # color distortion s=1 (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p 0.8, grayscale p 0.2), Gaussian blur
    # p 0.5 with sigma in [0.1, 2.0] and a kernel of 10% of the image side.
    "simclr": Recipe(scale=(0.08, 1.0), p_blur=0.5, **_SIMCLR_COLOR),
    # SwAV (Caron et al. 2020, arXiv 2006.09882), facebookresearch/swav src/multicropdataset.py:
    # RandomResizedCrop(size, scale=(min_scale, max_scale)), RandomHorizontalFlip(p=0.5),
    # get_color_distortion(s=1.0) (as SimCLR), PILRandomGaussianBlur (p 0.5, radius 0.1-2).
    # Multi-crop as in its README: 224 px crops with scale 0.14-1, 96 px crops with scale 0.05-0.14.
    "swav_global": Recipe(scale=(0.14, 1.0), p_blur=0.5, **_SIMCLR_COLOR),
    "swav_small": Recipe(scale=(0.05, 0.14), p_blur=0.5, **_SIMCLR_COLOR),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; raises ConfigError listing the valid names."""
    if name not in RECIPES:
        raise ConfigError(
            f"augmentation recipe {name!r} is unknown; use one of: {', '.join(sorted(RECIPES))}"
        )
    return RECIPES[name]
