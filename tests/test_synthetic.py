"""The procedural dataset: deterministic, real JPEGs, one folder per class."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.config import Config
from transferlab.synthetic import CLASSES, generate


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(synthetic_cfg: Config, synthetic_raw: Path) -> None:
    syn = synthetic_cfg.data.synthetic
    assert syn is not None
    classes = sorted(p.name for p in synthetic_raw.iterdir())
    assert classes == sorted(c.name for c in CLASSES[: syn.num_classes])
    for name in classes:
        assert len(list((synthetic_raw / name).glob("*.jpg"))) == syn.images_per_class


def test_files_are_real_jpegs(synthetic_cfg: Config, synthetic_raw: Path) -> None:
    syn = synthetic_cfg.data.synthetic
    assert syn is not None
    for path in synthetic_raw.rglob("*.jpg"):
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (syn.image_size, syn.image_size)


def test_same_seed_gives_identical_bytes(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    assert synthetic_cfg.data.synthetic is not None
    again = tmp_path / "again"
    generate(synthetic_cfg.data.synthetic, again)
    assert _files(again) == _files(synthetic_raw)


def test_other_seed_differs(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    assert synthetic_cfg.data.synthetic is not None
    other_cfg = dataclasses.replace(synthetic_cfg.data.synthetic, seed=synthetic_cfg.data.synthetic.seed + 1)
    other = tmp_path / "other"
    generate(other_cfg, other)
    ours, theirs = _files(synthetic_raw), _files(other)
    assert ours.keys() == theirs.keys()
    assert all(ours[name] != theirs[name] for name in ours)


def test_classes_differ_in_colour(tmp_path: Path) -> None:
    """The shapes' colours of any two classes differ by far more than the colour jitter."""
    from transferlab.config import SyntheticConfig

    generate(SyntheticConfig(num_classes=8, images_per_class=5, image_size=48, seed=3), tmp_path)
    means = {}
    for cls in CLASSES:
        shape_colours = []
        for path in sorted((tmp_path / cls.name).glob("*.jpg")):
            pixels = np.asarray(Image.open(path), dtype=np.float32).reshape(-1, 3)
            shape_colours.append(pixels[pixels.sum(1).argsort()[-40:]].mean(0))  # brightest: the shape
        means[cls.name] = np.mean(shape_colours, 0)
    names = list(means)
    gaps = [np.abs(means[a] - means[b]).max() for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(gaps) > 30
