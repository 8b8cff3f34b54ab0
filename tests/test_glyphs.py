"""The embedded glyph dataset: class choice, splits, rendering, determinism and caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.ft2font import FT2Font

from dfml_bench.data import glyphs
from dfml_bench.data.base import SPLITS, ClassSplit
from dfml_bench.data.registry import dataset_entry

PER_CLASS = 20  # small builds keep the suite fast; the default is glyphs.IMAGES_PER_CLASS


@pytest.fixture(scope="module")
def codes() -> list[int]:
    return [code for domain in glyphs.DOMAINS for code in glyphs.select_classes()[domain.key]]


@pytest.fixture(scope="module")
def union() -> dict[str, ClassSplit]:
    return glyphs.build_glyph_splits(32, PER_CLASS, seed=0)


def _names(splits: dict[str, ClassSplit]) -> dict[str, set[str]]:
    return {split: set(splits[split].class_names) for split in SPLITS}


def test_class_counts_and_split_sizes(union: dict[str, ClassSplit], codes: list[int]) -> None:
    sizes = {split: union[split].num_classes for split in SPLITS}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    names = [name for split in SPLITS for name in union[split].class_names]
    assert len(names) == len(set(names)) == 100  # so the splits are disjoint too
    assert len(set(codes)) == 100
    assert all(name.count(":") == 2 and ":U+" in name for name in names)


def test_images_are_uint8_rgb_with_every_class_filled(union: dict[str, ClassSplit]) -> None:
    for split in union.values():
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (3, 32, 32)
        counts = torch.bincount(split.labels, minlength=split.num_classes)
        assert counts.tolist() == [PER_CLASS] * split.num_classes


def test_domains_are_disjoint_and_make_up_the_union(union: dict[str, ClassSplit]) -> None:
    union_names = _names(union)
    seen: dict[str, set[str]] = {split: set() for split in SPLITS}
    for domain in glyphs.DOMAINS:
        names = {
            split: {glyphs.class_name(domain, code) for code in codes}
            for split, codes in glyphs.class_split(domain).items()
        }
        assert domain.num_classes >= 30
        assert len(names["val"]) >= 5 and len(names["test"]) >= 5  # enough for 5-way tasks
        for split in SPLITS:
            assert not names[split] & seen[split]
            seen[split] |= names[split]
    assert seen == union_names


def test_images_at_84_px() -> None:
    for domain in glyphs.DOMAINS:
        images = glyphs.render_class(domain, glyphs.select_classes()[domain.key][0], 84, 4, 0)
        assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 3, 84, 84)
        assert images.float().std() > 20  # a glyph on a background, not a flat image


@pytest.mark.slow
def test_build_is_deterministic_and_seeded() -> None:
    domain = glyphs.DOMAINS[1]
    first = glyphs.build_glyph_splits(32, 5, seed=3, dataset=domain.dataset)
    second = glyphs.build_glyph_splits(32, 5, seed=3, dataset=domain.dataset)
    other = glyphs.build_glyph_splits(32, 5, seed=4, dataset=domain.dataset)
    for split in SPLITS:
        assert first[split].images.numpy().tobytes() == second[split].images.numpy().tobytes()
        assert torch.equal(first[split].labels, second[split].labels)
        assert not torch.equal(first[split].images, other[split].images)


@pytest.mark.slow
def test_cache_round_trip_renders_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = glyphs.load_glyph_dataset("glyphs", 32, tmp_path, images_per_class=PER_CLASS)
    assert len(list(tmp_path.glob("*/index.json"))) == len(glyphs.DOMAINS)

    def no_render(*args: object) -> None:
        raise AssertionError("rendered again despite a cache")

    monkeypatch.setattr(glyphs, "build_domain_splits", no_render)
    monkeypatch.setattr(glyphs, "render_class", no_render)
    again = glyphs.load_glyph_dataset("glyphs", 32, tmp_path, images_per_class=PER_CLASS)
    for split in SPLITS:
        assert torch.equal(built.split(split).images, again.split(split).images)
        assert torch.equal(built.split(split).labels, again.split(split).labels)
        assert built.split(split).class_names == again.split(split).class_names
    assert built.mean == again.mean and built.std == again.std
    assert all(0 < value < 1 for value in built.mean + built.std)
    assert built.stand_in_for is None and built.notes["version"] == glyphs.GLYPHS_VERSION

    # each domain dataset is its own slice of the union, read from the same cache
    for domain in glyphs.DOMAINS:
        part = glyphs.load_glyph_dataset(domain.dataset, 32, tmp_path, PER_CLASS)
        for split in SPLITS:
            whole = built.split(split)
            keep = [i for i, n in enumerate(whole.class_names) if n.startswith(domain.key + ":")]
            assert part.split(split).class_names == tuple(whole.class_names[i] for i in keep)
            mask = torch.isin(whole.labels, torch.tensor(keep))
            assert torch.equal(part.split(split).images, whole.images[mask])


def test_datasets_are_registered_as_embedded() -> None:
    for name in ["glyphs", *(domain.dataset for domain in glyphs.DOMAINS)]:
        entry = dataset_entry(name)
        assert entry.embedded and entry.default_image_size == 32


@pytest.mark.slow
def test_classes_are_pairwise_distinct(codes: list[int]) -> None:
    masks = torch.stack([glyphs.canonical_mask(code) for code in codes])
    worst = 0.0
    for i in range(1, len(masks)):
        worst = max(worst, float(glyphs.glyph_similarity(masks[i], masks[:i]).max()))
    assert worst < glyphs.SIMILARITY_THRESHOLD


@pytest.mark.parametrize("pair", ["cC", "sS", "zZ", "lI", "З3", "AΑ", "OО", "ΦФ", "ρp", "б6"])
def test_similarity_flags_known_look_alikes(pair: str) -> None:
    first, second = (glyphs.canonical_mask(ord(char)) for char in pair)
    assert float(glyphs.glyph_similarity(first, second[None])[0]) >= glyphs.SIMILARITY_THRESHOLD


def test_curated_look_alikes_are_not_both_classes(codes: list[int]) -> None:
    chars = {chr(code) for code in codes}
    groups = ["AΑА", "BВ", "OoΟОο0", "lI1|Ӏ", "З3", "ΦФ", "ΓГ", "ΠП", "ΛЛ", "ΘѲ", "EЕ", "ρpр"]
    groups += [lower + lower.upper() for lower in "cosvwxzupk"]
    for group in groups:
        assert len(chars & set(group)) <= 1, group


def _looks_like_box(mask: torch.Tensor) -> bool:
    """A .notdef-style rectangle: ink along all four sides of its bounding box."""
    ink = mask > 0.5
    rows, cols = ink.any(dim=1).nonzero(), ink.any(dim=0).nonzero()
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float()
    sides = [crop[:2].amax(0), crop[-2:].amax(0), crop[:, :2].amax(1), crop[:, -2:].amax(1)]
    return min(float(side.mean()) for side in sides) >= 0.75


def test_box_check_catches_a_notdef_glyph() -> None:
    font = FT2Font(str(glyphs.font_dir() / glyphs.CANONICAL_FACE))
    font.set_size(96, 72)
    image = np.zeros((160, 160), np.uint8)
    font.draw_glyph_to_bitmap(image, 10, 10, font.load_glyph(0))
    assert _looks_like_box(torch.from_numpy(image / 255.0))


def test_every_face_draws_a_real_glyph(codes: list[int]) -> None:
    excluded = set(glyphs.EXCLUDED_FACES)
    for code in codes:
        faces = glyphs.faces_for(code)
        assert len(faces) >= glyphs.MIN_FACES
        assert not any(face.name in excluded or "Display" in face.name for face in faces)
        for face, mask in zip(faces, glyphs.class_face_masks(code, 64)[:, 0]):
            label = f"U+{code:04X} in {face.name}"
            assert float(mask.mean()) > 0.02, f"{label} is (nearly) empty"
            assert not _looks_like_box(mask), f"{label} is a box"
