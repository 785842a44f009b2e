"""cache_teacher pack + formats.images: real .beton files written from a real folder tree, read back two ways."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from ffcv.loader import Loader, OrderOption
from PIL import Image

from cache_teacher.__main__ import main
from cache_teacher.demo_data import write_backgrounds, write_person_images
from cache_teacher.pack import PackError, escape_path, pack, read_manifest, unescape_path
from formats.images import (ImageFile, ImagesFileError, check_images, image_pipelines, images_fingerprint,
                            unflatten_images)
from helpers import can_mount_tmpfs


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
    with pytest.raises(PackError, match="holds no images"):
        pack(tmp_path / "empty", tmp_path / "x.beton")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PackError, match="none of the 1 images"):
        pack(tmp_path / "broken", tmp_path / "x.beton", workers=1, progress=False)
    assert not (tmp_path / "x.beton").exists()
    assert main(["pack", str(tmp_path / "empty"), str(tmp_path / "x.beton")]) == 2
    assert "holds no images" in capsys.readouterr().err
    with pytest.raises(ImagesFileError, match="does not exist"):
        ImageFile(tmp_path / "nothing.beton")
    shutil.copy(__file__, tmp_path / "fake.beton")
    with pytest.raises(ImagesFileError, match="not a readable FFCV file"):
        ImageFile(tmp_path / "fake.beton")


def _varied_images(folder, count, rng):
    """`count` small images with distinct content: JPEGs (kept) and every 7th a PNG (re-encoded)."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = (rng.random((48, 32, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:04d}.{'png' if i % 7 == 0 else 'jpg'}"), image)


def test_packing_the_same_folder_twice_gives_the_same_bytes(tmp_path):
    """FFCV's parallel writer placed samples in whatever order its workers finished (so a re-pack changed the
    file and a store made from it was refused); now the default workers give byte-identical files."""
    _varied_images(tmp_path / "src", 300, np.random.default_rng(0))
    packs = []
    for attempt in range(3):
        out = tmp_path / f"copy{attempt}" / "images.beton"
        out.parent.mkdir()
        pack(tmp_path / "src", out, progress=False)
        packs.append(out)
    first = packs[0].read_bytes()
    for out in packs[1:]:
        assert out.read_bytes() == first
        assert (out.parent / "images.beton.manifest.tsv").read_bytes() == \
            (packs[0].parent / "images.beton.manifest.tsv").read_bytes()
    assert images_fingerprint(packs[1]) == images_fingerprint(packs[0])


def test_a_damaged_image_is_found_by_the_full_check(packed, tmp_path):
    root, _ = packed
    damaged = tmp_path / "damaged.beton"
    shutil.copy(root / "persons.beton", damaged)
    start, size = ImageFile(damaged).span(3)
    with open(damaged, "r+b") as handle:  # one flipped bit in the middle of image 3's JPEG data
        handle.seek(start + size // 2)
        byte = handle.read(1)[0]
        handle.seek(start + size // 2)
        handle.write(bytes([byte ^ 0x08]))
    check_images(root / "persons.beton")
    with pytest.raises(ImagesFileError, match=rf"{damaged}: 1 of 10 images are damaged .*first: \[3\]\).*re-pack"):
        check_images(damaged)
    images = ImageFile(damaged)
    with pytest.raises(ImagesFileError, match=rf"image 3 of {damaged} is damaged"):
        images.image(3)
    assert np.array_equal(images.image(2), ImageFile(root / "persons.beton").image(2))


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (96, 1))  # black -> white, left to right
    cv2.imwrite(str(src / "grey16.png"), ramp)  # a 16-bit greyscale PNG
    with Image.open(src / "grey16.png") as img:
        assert img.mode in ("I;16", "I")
    cv2.imwrite(str(src / "rgb16.png"), np.repeat(ramp[..., None], 3, axis=2))  # 16-bit RGB: already right
    pack(src, tmp_path / "out.beton", workers=1, progress=False)
    images = ImageFile(tmp_path / "out.beton")
    expected = np.rint(ramp / 257.0)
    for index in range(2):
        grey = images.image(index).astype(float).mean(axis=2)
        assert np.abs(grey - expected).mean() < 2.0, index  # JPEG error only (it was 95% white)


def test_gif_webp_and_other_files_are_packed_or_listed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(2)
    colours = {}
    for name, fmt in (("a.gif", "GIF"), ("b.webp", "WEBP"), ("c_webp_named.jpg", "WEBP")):
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        colours[name] = colour
        Image.fromarray(np.broadcast_to(colour, (40, 24, 3)).copy()).save(src / name, format=fmt, lossless=True)
    frames = [Image.fromarray(np.full((40, 24, 3), value, np.uint8)) for value in (30, 220)]
    frames[0].save(src / "d_animated.gif", save_all=True, append_images=frames[1:])
    colours["d_animated.gif"] = np.full(3, 30)  # the first frame
    (src / "notes.txt").write_text("not an image")
    (src / "e.tiff").write_bytes((src / "a.gif").read_bytes())
    summary = pack(src, tmp_path / "out.beton", workers=1, progress=False)
    assert summary["packed"] == 4 and summary["skipped"] == 2
    rows = read_manifest(tmp_path / "out.beton.manifest.tsv")
    images = ImageFile(tmp_path / "out.beton")
    for row in rows:
        assert row.stored == "re-encoded"
        pixels = images.image(row.index).reshape(-1, 3).astype(int)
        assert np.abs(pixels - colours[row.source_path]).max() <= 6, row.source_path
    report = (tmp_path / "out.beton.skipped.tsv").read_text().splitlines()
    assert report[1:] == ["e.tiff\tnot an image type pack reads (.tiff)", "notes.txt\tnot an image type pack reads (.txt)"]


def test_manifest_round_trips_any_file_name_and_odd_names_do_not_break_pack(tmp_path):
    src = tmp_path / "src"
    (src / "sub\tdir").mkdir(parents=True)
    names = [b"tab\there.jpg", b"new\nline.jpg", b"cr\rreturn.jpg", b"back\\slash\\x41\\t.jpg", b"caf\xe9-latin1.jpg",
             b"ctrl\x01\x7f.jpg", "ünïcode-名前.jpg".encode(), b"sub\tdir/inner\xff\xfe.png", b" lead space .jpg"]
    colours = {}
    for i, name in enumerate(names):
        colour = np.array([20 * i + 10, 255 - 20 * i, (70 * i) % 256], np.uint8)
        colours[name] = colour
        ok, data = cv2.imencode(os.fsdecode(name)[-4:], np.broadcast_to(colour[::-1], (32, 16, 3)).copy())
        assert ok
        with open(os.path.join(os.fsencode(src), name), "wb") as handle:
            handle.write(data.tobytes())
    with open(os.path.join(os.fsencode(src), b"broken\xff\n.jpg"), "wb") as handle:
        handle.write(b"not a jpeg")
    with open(os.path.join(os.fsencode(src), b"readme\xfe.txt"), "wb") as handle:
        handle.write(b"text")
    summary = pack(src, tmp_path / "out.beton", workers=2, progress=False)
    assert summary["packed"] == len(names) and summary["skipped"] == 2
    assert not list(tmp_path.glob("*.partial"))
    manifest = (tmp_path / "out.beton.manifest.tsv").read_text(encoding="utf-8")
    assert len(manifest.splitlines()) == len(names) + 1  # one line per image, whatever the names hold
    rows = read_manifest(tmp_path / "out.beton.manifest.tsv")
    assert sorted(os.fsencode(row.source_path) for row in rows) == sorted(names)
    images = ImageFile(tmp_path / "out.beton")
    for row in rows:
        assert (src / row.source_path).is_file()
        pixels = images.image(row.index).reshape(-1, 3).astype(int)
        assert np.abs(pixels - colours[os.fsencode(row.source_path)]).max() <= 8, row.source_path
    report = [line.split("\t") for line in (tmp_path / "out.beton.skipped.tsv").read_text().splitlines()[1:]]
    assert sorted(os.fsencode(unescape_path(path)) for path, _ in report) == [b"broken\xff\n.jpg", b"readme\xfe.txt"]
    for text in ("a\\b", "\t\n\r", "\\x41", "caf\udce9", "\x00\x1f\x7f", "名前"):
        assert unescape_path(escape_path(text)) == text
        assert "\t" not in escape_path(text) and "\n" not in escape_path(text)


def test_the_skip_report_lists_links_loops_and_entries_that_are_not_files(packed, tmp_path):
    """Nothing under the source folder is left out silently: a dangling link, a link loop, a link to a folder
    (not followed, so no image is packed twice) and a FIFO are each listed with the reason."""
    src = tmp_path / "src"
    shutil.copytree(packed[0] / "persons", src / "video000")
    (src / "dangling.jpg").symlink_to("nowhere.jpg")
    (src / "loop-a").symlink_to("loop-b")
    (src / "loop-b").symlink_to("loop-a")
    (src / "video000" / "video000" / "up").symlink_to("..")
    os.mkfifo(src / "pipe.jpg")
    assert main(["pack", str(src), str(tmp_path / "out.beton")]) == 0
    report = dict(line.split("\t") for line in (tmp_path / "out.beton.skipped.tsv").read_text().splitlines()[1:])
    assert report.pop("video000/video000/corrupt_truncated.jpg").startswith("OSError")
    assert report == {"dangling.jpg": "dangling symbolic link (to nowhere.jpg, which does not exist)",
                      "loop-a": "symbolic link loop (loop-b)", "loop-b": "symbolic link loop (loop-a)",
                      "video000/video000/up": "symbolic link to a folder (..), not followed",
                      "pipe.jpg": "not a regular file (a FIFO, socket or device)"}


@pytest.mark.e2e
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs (a real full disk)")
def test_a_full_disk_names_the_file_and_the_disk_and_leaves_nothing(packed, tmp_path):
    """A real full disk (tiny tmpfs in a private mount namespace), during the scan's re-encoding and before the
    FFCV writer (whose writer process would fail unnoticed and hang the pack): one line naming the output and
    the disk; no report, manifest or temporary file left."""
    results = {}
    for size in ("4k", "2m"):
        disk = tmp_path / f"disk-{size}"
        disk.mkdir()
        command = [sys.executable, "-m", "cache_teacher", "pack", str(packed[0] / "persons"), str(disk / "p.beton")]
        script = f'mount -t tmpfs -o size={size} tmpfs {disk} && {{ {shlex.join(command)}; echo "status $?"; ls -A {disk}; }}'
        results[size] = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                                       timeout=300)
    for size, done in results.items():
        assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr
        assert done.stdout.split() == ["status", "2"], done.stdout  # nothing listed on the disk
        last = done.stderr.strip().splitlines()[-1]
        assert f"/disk-{size}/p.beton" in last and f"on the disk mounted at {tmp_path}/disk-{size}, " in last, last
    assert "error: disk full while packing" in results["4k"].stderr
    assert "needs up to" in results["2m"].stderr and "(FFCV writes whole 8 MiB pages)" in results["2m"].stderr


def test_the_writer_bar_is_labelled_or_silent(tmp_path, capsys):
    import ffcv.writer

    original = ffcv.writer.tqdm
    write_backgrounds(tmp_path / "src", 3, np.random.default_rng(2))
    pack(tmp_path / "src", tmp_path / "shown.beton", progress=True)
    err = capsys.readouterr().err
    assert "write shown.beton" in err and "scan src" in err
    assert not any(line.lstrip().startswith(("0%", "100%")) for line in err.replace("\r", "\n").splitlines())
    pack(tmp_path / "src", tmp_path / "silent.beton", progress=False)
    assert capsys.readouterr().err == "" and ffcv.writer.tqdm is original
