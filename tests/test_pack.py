"""cache_teacher pack + ffcv_images: real .beton files written from a real folder tree, read back two ways."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from ffcv.loader import Loader, OrderOption

from cache_teacher.__main__ import main
from cache_teacher.demo_data import write_backgrounds, write_person_images
from cache_teacher.ffcv_images import ImageFile, ImagesFileError, image_pipelines, images_fingerprint, unflatten_images
from cache_teacher.pack import PackError, pack


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    write_person_images(root / "persons", 10, np.random.default_rng(1))
    summary = pack(root / "persons", root / "persons.beton", max_side=400, workers=2, progress=False)
    return root, summary


def _manifest(root):
    lines = (root / "persons.beton.manifest.tsv").read_text().splitlines()[1:]
    return [line.split("\t") for line in lines]


def test_pack_counts_skips_corrupt_and_writes_manifest(packed):
    root, summary = packed
    assert summary["packed"] == 10 and summary["skipped"] == 1
    report = (root / "persons.beton.skipped.tsv").read_text().splitlines()
    assert len(report) == 2 and report[1].startswith("video000/corrupt_truncated.jpg\t")
    rows = _manifest(root)
    assert [int(r[0]) for r in rows] == list(range(10))
    assert all((root / "persons" / r[1]).is_file() for r in rows)
    assert not (root / "persons.beton.partial").exists()


def test_kept_jpegs_are_byte_identical_and_others_bounded(packed):
    root, _ = packed
    images = ImageFile(root / "persons.beton")
    for index, rel, height, width, stored in _manifest(root):
        index, height, width = int(index), int(height), int(width)
        assert (images.heights[index], images.widths[index]) == (height, width)
        assert max(height, width) <= 400
        if stored == "original":
            assert images.jpeg_bytes(index).tobytes() == (root / "persons" / rel).read_bytes()
        decoded = images.image(index)
        assert decoded.shape == (height, width, 3) and decoded.dtype == np.uint8
    stored = {r[1]: r[4] for r in _manifest(root)}
    assert stored["video000/person_0002.png"] == "re-encoded"  # RGBA PNG
    assert stored["video000/person_0005.jpg"] == "re-encoded"  # oversized (720 px)
    assert stored["video000/person_0001.jpg"] == "original"  # grey JPEG is decodable as RGB as-is
    grey = images.image(1).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1


def test_pixels_match_source_and_ffcv_loader(packed):
    root, _ = packed
    images = ImageFile(root / "persons.beton")
    first = cv2.cvtColor(cv2.imread(str(root / "persons" / _manifest(root)[0][1])), cv2.COLOR_BGR2RGB)
    # FFCV's libjpeg-turbo call uses fast DCT/upsampling, OpenCV the accurate ones: close, not equal
    difference = np.abs(images.image(0).astype(int) - first.astype(int))
    assert difference.mean() < 1.0 and difference.max() <= 8
    loader = Loader(str(root / "persons.beton"), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines=image_pipelines(root / "persons.beton"), drop_last=False)
    seen = 0
    for flat, heights, widths in loader:
        for image in unflatten_images(flat, heights, widths):
            assert np.array_equal(image.numpy(), images.image(seen))  # the two stages see the same pixels
            seen += 1
    assert seen == 10


def test_fingerprint_is_stable_and_tells_files_apart(packed, tmp_path):
    root, _ = packed
    assert images_fingerprint(root / "persons.beton") == images_fingerprint(root / "persons.beton")
    write_backgrounds(tmp_path / "bg", 3, np.random.default_rng(0))
    pack(tmp_path / "bg", tmp_path / "bg.beton", workers=1, progress=False)
    assert images_fingerprint(tmp_path / "bg.beton") != images_fingerprint(root / "persons.beton")


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    with pytest.raises(PackError, match="does not exist"):
        pack(tmp_path / "missing", tmp_path / "x.beton")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="no JPEG/PNG"):
        pack(tmp_path / "empty", tmp_path / "x.beton")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PackError, match="none of the 1 images"):
        pack(tmp_path / "broken", tmp_path / "x.beton", workers=1, progress=False)
    assert not (tmp_path / "x.beton").exists()
    assert main(["pack", str(tmp_path / "empty"), str(tmp_path / "x.beton")]) == 2
    assert "no JPEG/PNG" in capsys.readouterr().err
    with pytest.raises(ImagesFileError, match="does not exist"):
        ImageFile(tmp_path / "nothing.beton")
    shutil.copy(__file__, tmp_path / "fake.beton")
    with pytest.raises(ImagesFileError, match="not a readable FFCV file"):
        ImageFile(tmp_path / "fake.beton")
