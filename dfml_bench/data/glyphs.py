"""Embedded few-shot dataset: characters rendered from the fonts bundled with matplotlib.

It needs no download, so the benchmark (and its tests) run anywhere. Each class is one code
point; 100 visually distinct classes are split over three domains with clearly different
rendering styles, so the multi-dataset scenario has a cheap, offline stand-in too. Glyph masks
come from FreeType (`FT2Font`) at twice the target resolution; all augmentation is batched torch
on the CPU, seeded per class with no order-dependent reductions, so a build is byte-identical for
a given seed (checked across CPUs, thread counts and torch versions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font

from dfml_bench.data.base import SPLITS, ClassSplit, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.registry import register_dataset

try:
    from matplotlib.ft2font import LoadFlags

    _NO_HINTING = LoadFlags.NO_HINTING
except ImportError:  # matplotlib < 3.10 exposes load flags as module-level ints
    from matplotlib.ft2font import LOAD_NO_HINTING as _NO_HINTING  # type: ignore[attr-defined]

GLYPHS_VERSION = "1"  # bump whenever class selection, rendering or augmentation changes
IMAGES_PER_CLASS = 500
DEFAULT_IMAGE_SIZE = 32
DEFAULT_SEED = 0
SPLIT_SEED = 0  # the class split is part of the benchmark, independent of the image seed
MIN_FACES = 2
SIMILARITY_THRESHOLD = 0.9
CANONICAL_SIZE = 64
CANONICAL_FACE = "DejaVuSans.ttf"

# Faces whose cmap maps letters to unrelated math symbols, the fallback face that draws every
# code point as a labelled box, and the *Display faces (a handful of oversized glyphs only).
EXCLUDED_FACES = ("LastResortHE-Regular.ttf", "cmsy10.ttf", "cmex10.ttf", "cmmi10.ttf")


@dataclass(frozen=True)
class GlyphDomain:
    """One rendering style over its own characters (disjoint from the other domains)."""

    key: str
    dataset: str
    # Candidates in priority order; known look-alikes of earlier candidates (same shape at
    # another scale, or the same letter in another script) are already left out by hand.
    candidates: str
    split_sizes: tuple[int, int, int]  # train / val / test classes
    description: str

    @property
    def num_classes(self) -> int:
        return sum(self.split_sizes)


DOMAINS: tuple[GlyphDomain, ...] = (
    GlyphDomain(
        key="latin",
        dataset="glyphs-latin",
        # No O/0 or I/l/1; lowercase only where it differs from the capital in shape, not size.
        # The automatic check drops 9 ~ g; the quota stops after T.
        candidates="ABCDEFGHJKLMNPQRabdefghnrt23456789TVWXYZUSmyqj",
        split_sizes=(22, 5, 7),
        description="Latin letters and digits, dark ink on light paper",
    ),
    GlyphDomain(
        key="greek-cyrillic",
        dataset="glyphs-greek-cyrillic",
        # Only letters unlike any Latin one (no А В Е К М Н О Р С Т Х, З ~ 3, Ь ~ b, ρ ~ p, δ ~ 6);
        # Greek wins where Greek and Cyrillic share a shape (Г П Ф Л), Щ ~ Ш is left out.
        # The automatic check then drops Γ ~ r, Θ ~ e and Π ~ n.
        candidates="ΓΔΘΛΞΠΣΦΨΩαβελμξπσωБДЖИЦЧШЪЫЭЮЯЉЊЂӘζϞϑϠ",
        split_sizes=(21, 5, 7),
        description="Greek and Cyrillic letters unlike Latin ones, light glyph on dark noise",
    ),
    GlyphDomain(
        key="armenian-georgian",
        dataset="glyphs-armenian-georgian",
        # Armenian capitals and Georgian Mkhedruli interleaved, without letters shaped like a
        # Latin, Greek or digit glyph or like each other (Ա Է Լ Ճ Յ Ո Ռ Ս Տ Ր Ւ Փ Օ Ժ Ձ,
        # ბ გ ვ ზ ი ნ ო პ უ ყ ძ ხ ღ წ). The automatic check drops Ղ ~ Դ.
        candidates="ԲაԳდԴეԵთԶკԸლԹმԻჟԽრԾსԿტՀფქՂՄშՆჩՇცՉՊჭՋჯՎჰՑՔՖ",
        split_sizes=(21, 6, 6),
        description="Armenian capitals and Georgian letters, outlined in colour on a gradient",
    ),
)
DATASET_DOMAINS: dict[str, tuple[GlyphDomain, ...]] = {"glyphs": DOMAINS} | {
    domain.dataset: (domain,) for domain in DOMAINS
}


# --------------------------------------------------------------------------- fonts and masks


def font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def usable_faces() -> tuple[Path, ...]:
    """Bundled faces that draw real letters (see EXCLUDED_FACES), in a fixed order."""
    return tuple(
        path
        for path in sorted(font_dir().glob("*.ttf"))
        if path.name not in EXCLUDED_FACES and "Display" not in path.stem
    )


@cache
def _font(path: Path) -> FT2Font:
    return FT2Font(str(path))


@cache
def _charmap(path: Path) -> frozenset[int]:
    font = _font(path)
    return frozenset(code for code in font.get_charmap() if font.get_char_index(code) != 0)


def faces_for(code: int) -> tuple[Path, ...]:
    """Faces whose cmap really holds `code`: rendering them never yields a .notdef box."""
    return tuple(path for path in usable_faces() if code in _charmap(path))


def render_glyph(path: Path, code: int, canvas: int, box: int) -> torch.Tensor:
    """Ink mask [canvas, canvas] in [0, 1]: the glyph scaled (aspect kept) to fit `box`, centred.

    Scale-normalising to the ink box makes glyphs comparable across faces and cases, which is
    why same-shape upper/lower case pairs must not both be classes.
    """
    if code not in _charmap(path):
        raise ValueError(f"{path.name} has no glyph for U+{code:04X}")
    font = _font(path)
    font.set_size(2 * box, 72)  # 1 pt = 1 px, about twice the box: downsampled with antialias
    font.set_text(chr(code), 0.0, flags=_NO_HINTING)  # unhinted: same outline at every size
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image())
    rows, cols = np.nonzero(bitmap.any(axis=1))[0], np.nonzero(bitmap.any(axis=0))[0]
    out = torch.zeros(canvas, canvas)
    if len(rows) == 0:
        return out
    ink = torch.from_numpy(bitmap[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] / 255.0)
    scale = box / max(ink.shape)
    height, width = (max(1, round(side * scale)) for side in ink.shape)
    ink = F.interpolate(
        ink.float()[None, None], size=(height, width), mode="bilinear", antialias=True
    )[0, 0]
    top, left = (canvas - height) // 2, (canvas - width) // 2
    out[top : top + height, left : left + width] = ink.clamp(0, 1)
    return out


def _dilate(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max filter over a (2r+1)^2 square on [.., H, W] values >= 0 (outside counts as 0).

    Separable, with running maxima over doubling spans: O(log r) elementwise maxima per axis,
    several times faster than max_pool2d on the CPU.
    """
    window = 2 * radius + 1
    out = x
    for dim, padding in ((-1, (radius, radius, 0, 0)), (-2, (0, 0, radius, radius))):
        out, span = F.pad(out, padding), 1
        while span < window:  # invariant: out[i] = max of the input over [i, i + span)
            step = min(span, window - span)
            length = out.shape[dim] - step
            out = torch.maximum(out.narrow(dim, 0, length), out.narrow(dim, step, length))
            span += step
    return out


def canonical_mask(code: int) -> torch.Tensor:
    """The glyph in one fixed style (DejaVu Sans, 56 px box on 64 px) for look-alike checks."""
    return render_glyph(font_dir() / CANONICAL_FACE, code, CANONICAL_SIZE, CANONICAL_SIZE * 7 // 8)


def glyph_similarity(mask: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Similarity in [0, 1] of canonical `mask` [S, S] to each of `others` [K, S, S] (-> [K]).

    The share of each glyph's ink lying within 1 px of the other's ink (the smaller of the two
    shares), maximised over shifts of up to S/16 px. Same-shape glyphs score ~1 whatever their
    stroke widths; a missing or extra stroke (E vs F) lowers it by that stroke's share of ink.
    """
    shift = mask.shape[-1] // 16
    padding = (shift + 1,) * 4  # so that shifting never wraps ink around the border
    a = F.pad((mask > 0.5).float(), padding)[None, None]
    b = F.pad((others > 0.5).float(), padding)[:, None]
    offsets = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    a_grown = _dilate(a, 1)
    a_shifted = torch.cat([torch.roll(a, o, dims=(2, 3)) for o in offsets]).flatten(1)
    a_grown = torch.cat([torch.roll(a_grown, o, dims=(2, 3)) for o in offsets]).flatten(1)
    b_flat, b_grown = b.flatten(1), _dilate(b, 1).flatten(1)
    a_share = (b_grown @ a_shifted.T) / a_shifted.sum(dim=1).clamp_min(1)  # [K, shifts]
    b_share = (b_flat @ a_grown.T) / b_flat.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.minimum(a_share, b_share).amax(dim=1)


@cache
def select_classes() -> dict[str, tuple[int, ...]]:
    """Code points of each domain: curated candidates, greedily dropping automatic look-alikes.

    Candidates are visited domain by domain in priority order; one is kept when it has at least
    MIN_FACES faces and its similarity to every class kept so far (any domain) is below
    SIMILARITY_THRESHOLD, until the domain has its number of classes.
    """
    kept: list[torch.Tensor] = []
    selected: dict[str, tuple[int, ...]] = {}
    for domain in DOMAINS:
        codes: list[int] = []
        for code in map(ord, domain.candidates):
            if len(codes) == domain.num_classes:
                break
            if len(faces_for(code)) < MIN_FACES:
                continue
            mask = canonical_mask(code)
            if kept and glyph_similarity(mask, torch.stack(kept)).max() >= SIMILARITY_THRESHOLD:
                continue
            kept.append(mask)
            codes.append(code)
        if len(codes) < domain.num_classes:
            raise RuntimeError(f"only {len(codes)} distinct {domain.key} glyphs available")
        selected[domain.key] = tuple(codes)
    return selected


def class_name(domain: GlyphDomain, code: int) -> str:
    return f"{domain.key}:U+{code:04X}:{chr(code)}"


def code_point(name: str) -> int:
    """Inverse of `class_name`."""
    return int(name.split(":")[1].removeprefix("U+"), 16)


def class_split(domain: GlyphDomain) -> dict[str, tuple[int, ...]]:
    """Seeded shuffle of the domain's classes cut into train/val/test (each sorted)."""
    codes = select_classes()[domain.key]
    generator = torch.Generator().manual_seed(SPLIT_SEED * 1000 + DOMAINS.index(domain))
    order = [codes[i] for i in torch.randperm(len(codes), generator=generator).tolist()]
    out, start = {}, 0
    for split, count in zip(SPLITS, domain.split_sizes):
        out[split] = tuple(sorted(order[start : start + count]))
        start += count
    return out


# --------------------------------------------------------------------------- augmentation


def _affine(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-15 deg), scale (0.75-1.05), shear and translation of [n, 1, R, R]."""
    n, size = masks.shape[0], masks.shape[-1]
    u = torch.rand(n, 5, generator=generator)
    angle = (u[:, 0] * 2 - 1) * torch.pi / 12
    scale = 0.75 + 0.3 * u[:, 1]
    shear = (u[:, 2] * 2 - 1) * 0.2
    shift = (u[:, 3:5] * 2 - 1) * 0.16  # in [-1, 1] image coordinates: +-8 % of the width
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Forward map: scale * rotate @ [[1, shear], [0, 1]] (determinant scale^2), then shift.
    # grid_sample needs output -> input; the 2x2 inverse is written out, so no LAPACK call.
    inverse = torch.stack([sin * shear + cos, sin - cos * shear, -sin, cos], 1) / scale[:, None]
    axis = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres, align_corners=False
    across = axis[None, None, :] - shift[:, 0, None, None]
    down = axis[None, :, None] - shift[:, 1, None, None]
    m = inverse[:, :, None, None]
    grid = torch.stack([m[:, 0] * across + m[:, 1] * down, m[:, 2] * across + m[:, 3] * down], -1)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _stroke_jitter(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blend each mask towards its erosion or its dilation: thinner or bolder strokes."""
    radius = max(1, masks.shape[-1] // 64)
    weight = torch.rand(masks.shape[0], generator=generator) * 1.6 - 0.6
    bolder = weight > 0
    target = torch.empty_like(masks)
    target[bolder] = _dilate(masks[bolder], radius)
    target[~bolder] = -_dilate(-masks[~bolder], radius)
    return masks + weight.abs()[:, None, None, None] * (target - masks)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[n] hue, saturation, value in [0, 1] -> [n, 3, 1, 1] RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return (v[:, None] - (v * s)[:, None] * ramp)[:, :, None, None]


def _smooth_noise(n: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency noise [n, 1, size, size] of roughly unit scale (paper texture, blotches)."""
    coarse = torch.randn(n, 1, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _paper_style(masks: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Dark ink of a random hue on off-white, faintly textured paper."""
    n = masks.shape[0]
    ink = F.avg_pool2d(masks, 2)
    tint = (torch.rand(n, 3, generator=generator) - 0.5) * 0.1
    paper = (torch.tensor([0.93, 0.90, 0.82]) + tint)[:, :, None, None]
    paper = paper + 0.035 * _smooth_noise(n, size, 5, generator)
    ink_rgb = (0.03 + torch.rand(n, 3, generator=generator) * 0.22)[:, :, None, None]
    alpha = ink * (0.8 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator))
    grain = 0.015 * torch.randn(n, 1, size, size, generator=generator)
    return paper * (1 - alpha) + ink_rgb * alpha + grain


def _night_style(masks: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Pale glyph on a dark background with blotches and strong colour noise."""
    n = masks.shape[0]
    ink = F.avg_pool2d(masks, 2)
    background = (torch.rand(n, 3, generator=generator) * 0.2)[:, :, None, None]
    background = background + 0.06 * _smooth_noise(n, size, 4, generator)
    glyph = (0.72 + torch.rand(n, 3, generator=generator) * 0.28)[:, :, None, None]
    sigma = 0.03 + 0.07 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = sigma * torch.randn(n, 3, size, size, generator=generator)
    return background * (1 - ink) + glyph * ink + noise


def _poster_style(masks: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Bright glyph with a dark outline on a two-colour linear gradient of nearby hues."""
    n = masks.shape[0]
    ink = F.avg_pool2d(masks, 2)
    ring = (_dilate(ink, max(1, size // 32)) - ink).clamp(0, 1)  # at output size: cheaper
    hue, u = torch.rand(n, generator=generator), torch.rand(n, 7, generator=generator)
    start = _hsv_to_rgb(hue, 0.5 + 0.4 * u[:, 0], 0.35 + 0.3 * u[:, 1])
    end = _hsv_to_rgb((hue + 0.15 + 0.2 * u[:, 2]) % 1, 0.5 + 0.4 * u[:, 3], 0.35 + 0.3 * u[:, 4])
    fill = _hsv_to_rgb(
        (hue + 0.4 + 0.2 * u[:, 5]) % 1, 0.55 + 0.45 * u[:, 6], torch.full((n,), 0.97)
    )
    direction = torch.rand(n, generator=generator) * 2 * torch.pi
    axis = torch.linspace(-1, 1, size)
    along = (
        torch.cos(direction)[:, None, None] * axis[None, None, :]
        + torch.sin(direction)[:, None, None] * axis[None, :, None]
    )
    ramp = (along[:, None] * 0.5 + 0.5).clamp(0, 1)
    background = start * (1 - ramp) + end * ramp
    outline = 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    image = background * (1 - ring) + outline * ring
    return image * (1 - ink) + fill * ink


STYLES: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "latin": _paper_style,
    "greek-cyrillic": _night_style,
    "armenian-georgian": _poster_style,
}


# --------------------------------------------------------------------------- building


def class_face_masks(code: int, resolution: int) -> torch.Tensor:
    """[faces, 1, R, R] masks of `code` in every face that has it, fitted to 75 % of the canvas.

    75 % leaves room for the largest scale (1.05) rotated by 15 degrees.
    """
    box = round(0.75 * resolution)
    return torch.stack([render_glyph(p, code, resolution, box) for p in faces_for(code)])[:, None]


def render_class(
    domain: GlyphDomain, code: int, image_size: int, images_per_class: int, seed: int
) -> torch.Tensor:
    """uint8 [n, 3, S, S] augmented images of one class; depends only on its own arguments.

    Masks are rendered and augmented at 2S and box-downsampled, which antialiases them.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + code)
    faces = class_face_masks(code, 2 * image_size)
    pick = torch.randint(len(faces), (images_per_class,), generator=generator)
    masks = _stroke_jitter(_affine(faces[pick], generator), generator).clamp(0, 1)
    image = STYLES[domain.key](masks, image_size, generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def build_domain_splits(
    domain: GlyphDomain, image_size: int, images_per_class: int, seed: int
) -> dict[str, ClassSplit]:
    """Render every class of one domain into its meta-splits."""
    out = {}
    for split, codes in class_split(domain).items():
        images = [render_class(domain, code, image_size, images_per_class, seed) for code in codes]
        labels = torch.arange(len(codes)).repeat_interleave(images_per_class)
        names = tuple(class_name(domain, code) for code in codes)
        out[split] = ClassSplit(torch.cat(images), labels, names)
    return out


def merge_splits(parts: list[dict[str, ClassSplit]]) -> dict[str, ClassSplit]:
    """Concatenate class-disjoint splits (one per domain) into one dataset's splits."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for split in SPLITS:
        pieces = [part[split] for part in parts]
        offsets = np.cumsum([0] + [piece.num_classes for piece in pieces[:-1]]).tolist()
        out[split] = ClassSplit(
            torch.cat([piece.images for piece in pieces]),
            torch.cat([piece.labels + offset for piece, offset in zip(pieces, offsets)]),
            tuple(name for piece in pieces for name in piece.class_names),
        )
    return out


def build_glyph_splits(
    image_size: int = DEFAULT_IMAGE_SIZE,
    images_per_class: int = IMAGES_PER_CLASS,
    seed: int = DEFAULT_SEED,
    dataset: str = "glyphs",
) -> dict[str, ClassSplit]:
    """Splits of `dataset` (the 100-class union by default), rendered now, without caching."""
    return merge_splits(
        [
            build_domain_splits(domain, image_size, images_per_class, seed)
            for domain in DATASET_DOMAINS[dataset]
        ]
    )


def _cache_key(domain: GlyphDomain, image_size: int, images_per_class: int, seed: int) -> str:
    """Changes with everything the images depend on; hashing inputs needs no rendering."""
    inputs = [
        GLYPHS_VERSION,
        matplotlib.__version__,
        domain.candidates,
        str(domain.split_sizes),
        str(SIMILARITY_THRESHOLD),
        *(f"{path.name}:{path.stat().st_size}" for path in usable_faces()),
    ]
    digest = hashlib.sha256("|".join(inputs).encode()).hexdigest()[:12]
    size = f"{image_size}px-{images_per_class}ipc"
    return f"{domain.dataset}-{size}-seed{seed}-v{GLYPHS_VERSION}-{digest}"


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] of uint8 [n, 3, H, W] from 256-bin histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(3):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def load_glyph_dataset(
    name: str,
    image_size: int,
    cache_dir: Path,
    images_per_class: int = IMAGES_PER_CLASS,
    seed: int = DEFAULT_SEED,
) -> FewShotDataset:
    """Load `glyphs` or one of its domains; each domain is rendered once into its own cache entry.

    The union is the concatenation of the domain caches, so no class is ever rendered twice.
    mean/std are measured on the meta-train split.
    """
    parts = [
        cached_splits(
            cache_dir,
            _cache_key(domain, image_size, images_per_class, seed),
            lambda d=domain: build_domain_splits(d, image_size, images_per_class, seed),
        )
        for domain in DATASET_DOMAINS[name]
    ]
    splits = merge_splits(parts)
    mean, std = channel_stats(splits["train"].images)
    codes = {code_point(n) for split in splits.values() for n in split.class_names}
    faces = sorted({path.stem for code in codes for path in faces_for(code)})
    notes = {
        "provenance": f"rendered offline from the fonts bundled with matplotlib "
        f"{matplotlib.__version__} (DejaVu, STIX, Computer Modern)",
        "fonts": ", ".join(faces),
        "version": GLYPHS_VERSION,
        "images_per_class": str(images_per_class),
        "seed": str(seed),
    }
    return FewShotDataset(name, image_size, splits, mean, std, stand_in_for=None, notes=notes)


def _register(name: str, description: str) -> None:
    def load(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
        return load_glyph_dataset(name, image_size, cache_dir)  # embedded: data_root unused

    register_dataset(
        name, default_image_size=DEFAULT_IMAGE_SIZE, embedded=True, description=description
    )(load)


_register("glyphs", "100 distinct characters in 3 rendering styles, from matplotlib's fonts")
for _domain in DOMAINS:
    _register(_domain.dataset, _domain.description)
