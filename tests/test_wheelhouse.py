"""The offline wheelhouse (`make wheelhouse`) installs with `pip install --no-index` into a fresh Python 3.12
environment that has only what the GPU image has, and FFCV from it decodes a .beton written by our `pack`.

The GPU image is stood in for by `.venv-oldest` (torch 2.11, triton 3.6, timm, numpy, numba, opencv headless,
... and none of the wheelhouse's packages), put on the fresh environment's path by a .pth file. Both folders
are built once by make (ignored by git) and reused: cold, about 1 minute for the wheelhouse (FFCV compiles)
and 2 for .venv-oldest; warm, this test takes about 30 s.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Minutes of building (the wheelhouse, a Python 3.12 venv standing in for the GPU image): `make test-wheelhouse`,
# kept out of `make test` so that it stays under ~15 minutes on 2 cores.
pytestmark = pytest.mark.wheelhouse

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / "wheelhouse" / "py3.12"
IMAGE_VENV = REPO / ".venv-oldest"


def _make(*targets: str) -> None:
    # PY: this interpreter runs the build script; INSTALLED empty: the project .venv is not (re)made from here.
    done = subprocess.run(["make", "-s", f"PY={sys.executable}", "INSTALLED=", *targets], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _without_pythonpath() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def built():
    _make("wheelhouse/py3.12/requirements.txt", ".venv-oldest/.installed")


@pytest.fixture(scope="module")
def fresh_env(built, tmp_path_factory):
    fresh = tmp_path_factory.mktemp("wheelhouse") / "fresh"
    subprocess.run([str(IMAGE_VENV / "bin" / "python"), "-m", "venv", str(fresh)], check=True, timeout=300)
    python = fresh / "bin" / "python"
    image_site = subprocess.run([str(IMAGE_VENV / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    fresh_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    # As a site directory, so that its own .pth files count too (setuptools' distutils shim: FFCV imports distutils).
    Path(fresh_site, "gpu_image.pth").write_text(f"import site; site.addsitedir({image_site!r})\n")
    # Offline, dependencies resolved: every one is in the wheelhouse or in the image layer.
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE),
                           "-r", str(WHEELHOUSE / "requirements.txt")], capture_output=True, text=True, timeout=600,
                          env=_without_pythonpath())
    assert done.returncode == 0, done.stderr[-3000:]
    return python, Path(fresh_site)


def test_wheelhouse_is_small_and_its_packages_import_with_their_own_libraries(fresh_env):
    python, fresh_site = fresh_env
    sizes = sum(p.stat().st_size for p in WHEELHOUSE.glob("*.whl"))
    assert 0 < sizes < 60 * 2 ** 20
    probe = ("import json, ffcv, zarr, numcodecs, google_crc32c\n"
             "maps = open('/proc/self/maps').read().split()\n"
             "print(json.dumps({'ffcv': ffcv.__file__, 'zarr': zarr.__file__, 'numcodecs': numcodecs.__file__,"
             " 'native': sorted({p for p in maps if 'opencv' in p or 'turbojpeg' in p})}))\n")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300,
                          env=_without_pythonpath())
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("ffcv", "zarr", "numcodecs"):
        assert found[name].startswith(str(fresh_site)), found  # from the wheelhouse, not from the image layer
    # FFCV's native code runs on the libraries it carries, not on this machine's OpenCV / libjpeg-turbo.
    native = found["native"]
    assert {"libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0"} <= \
        {Path(p).name for p in native if "/ffcv.libs/" in p}, native
    assert not [p for p in native if p.startswith(("/usr/", "/lib"))], native


def test_ffcv_from_the_wheelhouse_decodes_a_beton_written_by_pack(fresh_env, tmp_path):
    import cv2

    from formats.images import ImageFile

    python, _ = fresh_env
    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for index, (h, w) in enumerate([(64, 32), (50, 41), (80, 30)]):  # different sizes, as persons come
        cv2.imwrite(str(tmp_path / "src" / f"{index}.jpg"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    beton = tmp_path / "images.beton"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(python), "-m", "cache_teacher", "pack", str(tmp_path / "src"), str(beton)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "decoded.npz"
    decode = ("import sys, numpy as np\nfrom formats.images import ImageFile\n"
              "f = ImageFile(sys.argv[1])\n"
              "np.savez(sys.argv[2], *[f.image(i) for i in range(f.num_images)])\n")
    done = subprocess.run([str(python), "-c", decode, str(beton), str(out)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    there = np.load(out)
    here = ImageFile(str(beton))
    assert len(there.files) == here.num_images == 3
    for index in range(3):
        assert np.array_equal(there[f"arr_{index}"], here.image(index))


def test_unsupported_python_version_is_named_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "acceptance" / "wheelhouse.py"), "--python", "3.9", "--out",
                           str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and not (tmp_path / "w").exists()
    assert done.stderr.strip() == ("wheelhouse: Python 3.9 is not supported for the wheelhouse; supported: "
                                   "3.11, 3.12, 3.13")


def test_gpu_check_installs_the_wheelhouse_where_the_image_lacks_its_packages(built, tmp_path):
    done = subprocess.run([str(IMAGE_VENV / "bin" / "python"), str(REPO / "acceptance" / "gpu_check.py"), "--mode",
                           "tiny", "--only", "kernels", "--wheelhouse", str(WHEELHOUSE), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env=_without_pythonpath(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert list(steps) == ["environment", "kernels path-b_vit-ti", "kernels all recipes"]
    environment = steps["environment"]["figures"]
    assert environment["installed_from_wheelhouse"] == ["ffcv", "zarr", "numcodecs", "google_crc32c"]
    assert environment["missing"] == {} and environment["torch"].startswith("2.11")
    assert (tmp_path.with_name(tmp_path.name + "_work") / "site" / "ffcv.libs").is_dir()  # beside OUT, not in it
