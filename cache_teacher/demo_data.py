"""`python -m cache_teacher demo-data OUT_DIR`: built-in inputs that need no download.

Writes OUT_DIR/persons (synthetic person-like figures in a LUPerson-like tree of sub-folders: varied
sizes, JPEG and PNG, a grey JPEG, an RGBA PNG, an oversized image, and one corrupt file that `pack`
must skip and report), OUT_DIR/backgrounds (non-person scenes for the crowd view) and OUT_DIR/<teacher>.pth
(a random-weight teacher in its real released layout, via `dpal.teachers.release_checkpoint`).
Everything is drawn from a fixed seed, so the demo is reproducible.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

DEFAULT_PERSONS = 48
DEFAULT_BACKGROUNDS = 16


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A non-person scene: a two-colour gradient with random boxes and lines (streets, walls, signs)."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = int(rng.integers(x0, width + 1)), int(rng.integers(y0, height + 1))
        cv2.rectangle(image, (x0, y0), (x1, y1), rng.integers(0, 256, 3).tolist(), -1)
    for _ in range(rng.integers(2, 6)):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p0, p1, rng.integers(0, 256, 3).tolist(), int(rng.integers(1, 5)))
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _person(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A centred standing figure (head, torso, arms, legs) on a scene, like a pedestrian crop."""
    image = _scene(rng, height, width)
    cx, unit = width / 2 + rng.normal(0, width * 0.04), height / 8
    skin = rng.integers(60, 240, 3).tolist()
    shirt, trousers = rng.integers(0, 256, 3).tolist(), rng.integers(0, 256, 3).tolist()
    limb = max(2, int(unit * 0.35))
    head = (int(cx), int(unit * 0.9))
    cv2.ellipse(image, head, (int(unit * 0.45), int(unit * 0.55)), 0, 0, 360, skin, -1)
    torso = (int(cx - unit * 0.8), int(unit * 1.5), int(cx + unit * 0.8), int(unit * 4.4))
    cv2.rectangle(image, torso[:2], torso[2:], shirt, -1)
    for side in (-1, 1):
        shoulder = (int(cx + side * unit * 0.8), int(unit * 1.7))
        hand = (int(cx + side * unit * (1.0 + rng.uniform(0, 0.6))), int(unit * (4.0 + rng.uniform(-0.3, 0.3))))
        cv2.line(image, shoulder, hand, shirt, limb)
        hip = (int(cx + side * unit * 0.4), int(unit * 4.4))
        foot = (int(cx + side * unit * (0.5 + rng.uniform(0, 0.4))), int(unit * 7.7))
        cv2.line(image, hip, foot, trousers, limb + 1)
    return cv2.GaussianBlur(image, (3, 3), 0.8)


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])


def write_person_images(folder: Path, count: int, rng: np.random.Generator) -> None:
    """LUPerson-like tree: a sub-folder per 'video', mostly JPEG, some special cases."""
    for index in range(count):
        height = int(rng.integers(128, 400))
        width = int(height * rng.uniform(0.38, 0.62))
        if index == 5:  # oversized: pack shrinks it to its max side
            height, width = 720, 300
        rgb = _person(rng, height, width)
        stem = folder / f"video{index // 12:03d}" / f"person_{index:04d}"
        if index == 1:  # grey JPEG
            path = stem.with_suffix(".jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        elif index == 2:  # RGBA PNG
            path = stem.with_suffix(".png")
            alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
            alpha[: height // 10] = 128
            cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([rgb, alpha], 2), cv2.COLOR_RGBA2BGRA))
        elif index % 7 == 3:  # RGB PNGs
            path = stem.with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        else:
            _write_jpeg(stem.with_suffix(".jpg"), rgb)
    corrupt = folder / "video000" / "corrupt_truncated.jpg"
    encoded = cv2.imencode(".jpg", _person(rng, 200, 100))[1].tobytes()
    corrupt.write_bytes(encoded[: len(encoded) // 3])


def write_backgrounds(folder: Path, count: int, rng: np.random.Generator) -> None:
    for index in range(count):
        height, width = int(rng.integers(200, 420)), int(rng.integers(200, 420))
        _write_jpeg(folder / f"background_{index:03d}.jpg", _scene(rng, height, width))


def write_demo_data(out_dir: str | Path, *, persons: int = DEFAULT_PERSONS, backgrounds: int = DEFAULT_BACKGROUNDS,
                    teacher: str = "path-b", seed: int = 0) -> dict:
    """Write the built-in inputs; returns their paths."""
    from dpal.teachers import build_teacher, release_checkpoint

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    write_person_images(out_dir / "persons", persons, rng)
    write_backgrounds(out_dir / "backgrounds", backgrounds, rng)
    torch.manual_seed(seed)
    checkpoint = out_dir / f"{teacher}.pth"
    torch.save(release_checkpoint(build_teacher(teacher)), checkpoint)
    paths = {"persons": str(out_dir / "persons"), "backgrounds": str(out_dir / "backgrounds"),
             "weights": str(checkpoint)}
    print(f"demo data in {out_dir}: {persons} person images (+1 corrupt file) in {paths['persons']}, "
          f"{backgrounds} backgrounds in {paths['backgrounds']}, random-weight {teacher} checkpoint {checkpoint}")
    return paths
