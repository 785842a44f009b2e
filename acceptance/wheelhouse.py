"""`make wheelhouse`: offline wheels of what a CUDA PyTorch image lacks, for one Python version (default 3.12).

A GPU machine that cannot reach a registry gets, from the folder this writes, every package of
`acceptance/wheelhouse.txt`:
- FFCV 1.0.2, compiled here against this machine's OpenCV and libjpeg-turbo. Its extension is linked
  against the two OpenCV modules it uses (core, imgproc) only, and every shared library it loads, except
  glibc's and the C++ runtime every Python image has, is copied into the wheel (`ffcv.libs/`) with
  RUNPATH=$ORIGIN, so the wheel loads where OpenCV and libjpeg-turbo are not installed. Its requirement
  `opencv-python` becomes `opencv-python-headless`: either provides the `cv2` FFCV's Python code imports,
  and CUDA images ship the headless one. The tag becomes manylinux_2_<this glibc>, the oldest glibc it loads on.
- zarr, numcodecs, google-crc32c and the small pure-Python dependencies: the registry's wheels for that Python.
- timm 1.0.23, the oldest supported: `acceptance/gpu_check.py` installs it only where the image's is older.

Not included, because the image has them (the assumption `acceptance/gpu_check.py` checks there): torch,
torchvision, triton, numpy, numba/llvmlite, pillow, opencv-python-headless, tqdm, psutil, pyyaml,
packaging, typing-extensions, safetensors, matplotlib, tensorboard, pytest, and setuptools (FFCV 1.0.2 imports
distutils, which Python 3.12 has only through setuptools' shim).

The folder also gets `requirements.txt` (exact pins, for `pip install --no-index --find-links DIR -r
DIR/requirements.txt`). The build fails, naming the size, when the wheels exceed the limit (60 MiB, so that
the folder and a checkout of the project copy to a GPU machine together as one small transfer).
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the project's argument types
from runtime.arguments import output_folder, real  # noqa: E402

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "wheelhouse.txt"
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")  # zarr 3.1 needs >= 3.11
DEFAULT_LIMIT_MIB = 60.0
FFCV_OPENCV_MODULES = ("opencv_imgproc", "opencv_core")  # what libffcv.cpp calls: cv::Mat, cv::resize
# Libraries every Linux Python image has; bundling them would break more than it fixes.
SYSTEM_LIBRARIES = re.compile(r"^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libutil|libresolv|"
                              r"libstdc\+\+|libgcc_s)[.-]")


class WheelhouseError(RuntimeError):
    pass


def find_python(version: str) -> str:
    """An interpreter of `version` on this machine (PATH, then pyenv's versions)."""
    if version not in SUPPORTED_PYTHONS:
        raise WheelhouseError(f"Python {version} is not supported for the wheelhouse; supported: "
                              f"{', '.join(SUPPORTED_PYTHONS)}")
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")),
                         reverse=True)
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    raise WheelhouseError(f"no python{version} interpreter on this machine (PATH or ~/.pyenv/versions); FFCV "
                          f"must be compiled by the Python it is for: install Python {version} first")


def pinned_requirements() -> list[str]:
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return [line for line in lines if line]


def _run(cmd: list[str], **kwargs) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise WheelhouseError(f"{' '.join(cmd[:4])} ... failed:\n{(done.stdout + done.stderr)[-3000:]}")


def _pkg_config(*args: str) -> str:
    done = subprocess.run(["pkg-config", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise WheelhouseError(f"pkg-config {' '.join(args)} failed ({done.stderr.strip()}): install "
                              "libopencv-dev libturbojpeg0-dev pkg-config (make install does)")
    return done.stdout.strip()


def build_ffcv(python: str, requirement: str, work: Path) -> Path:
    """Compile FFCV from its sdist, against OpenCV core + imgproc only (a private opencv4.pc)."""
    pc_dir = work / "pkgconfig"
    pc_dir.mkdir()
    cflags = _pkg_config("--cflags", "opencv4")
    libdir = _pkg_config("--variable=libdir", "opencv4")
    libs = " ".join(f"-l{module}" for module in FFCV_OPENCV_MODULES)
    (pc_dir / "opencv4.pc").write_text(f"Name: opencv4\nDescription: OpenCV modules FFCV links\n"
                                       f"Version: {_pkg_config('--modversion', 'opencv4')}\n"
                                       f"Cflags: {cflags}\nLibs: -L{libdir} {libs}\n")
    env = {**os.environ, "PKG_CONFIG_PATH": f"{pc_dir}:{os.environ.get('PKG_CONFIG_PATH', '')}",
           "LDFLAGS": "-Wl,--as-needed"}
    sdist_dir, wheel_dir = work / "sdist", work / "ffcv-wheel"
    _run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdist_dir), requirement])
    sdist = next(sdist_dir.iterdir())
    _run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(wheel_dir), str(sdist)], env=env)
    return next(wheel_dir.glob("ffcv-*.whl"))


def _needed_libraries(extension: Path) -> list[Path]:
    """Every shared library the extension loads (ldd: the transitive closure), minus the system's own."""
    out = subprocess.run(["ldd", str(extension)], capture_output=True, text=True, check=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise WheelhouseError(f"{extension.name} needs libraries this machine lacks: {', '.join(missing)}")
    found = []
    for line in out.splitlines():
        match = re.match(r"\s*(\S+) => (\S+)", line)
        if match and not SYSTEM_LIBRARIES.match(match.group(1)):
            found.append((match.group(1), Path(match.group(2))))
    return found


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def glibc_tag() -> str:
    major, minor = (int(part) for part in platform.libc_ver()[1].split(".")[:2])
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def bundle_libraries(wheel: Path, out_dir: Path, work: Path) -> Path:
    """Copy the extension's shared libraries into the wheel (ffcv.libs/, RUNPATH $ORIGIN), retag it."""
    tree = work / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tree)
    extension = next(tree.glob("ffcv/_libffcv*.so"))
    libs_dir = tree / "ffcv.libs"
    libs_dir.mkdir()
    for soname, path in _needed_libraries(extension):
        target = libs_dir / soname
        shutil.copyfile(path.resolve(), target)
        target.chmod(0o755)
        _run(["patchelf", "--set-rpath", "$ORIGIN", str(target)])
    _run(["patchelf", "--set-rpath", "$ORIGIN/../ffcv.libs", str(extension)])
    check = subprocess.run(["ldd", str(extension)], capture_output=True, text=True, check=True).stdout
    outside = [line.strip() for line in check.splitlines() if "=>" in line and "ffcv.libs" not in line
               and not SYSTEM_LIBRARIES.match(line.split()[0])]
    if outside:
        raise WheelhouseError(f"bundled {extension.name} still loads libraries from the system: {outside}")

    dist_info = next(tree.glob("ffcv-*.dist-info"))
    metadata = dist_info / "METADATA"
    metadata.write_text(re.sub(r"^Requires-Dist: opencv-python$", "Requires-Dist: opencv-python-headless",
                               metadata.read_text(), flags=re.M))
    tag_line = next(line for line in (dist_info / "WHEEL").read_text().splitlines() if line.startswith("Tag:"))
    old_tag = tag_line.split(":", 1)[1].strip()
    new_tag = re.sub(r"linux_x86_64$", glibc_tag(), old_tag)
    (dist_info / "WHEEL").write_text((dist_info / "WHEEL").read_text().replace(old_tag, new_tag))

    files = sorted(p for p in tree.rglob("*") if p.is_file() and p.name != "RECORD")
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path in files:
        data = path.read_bytes()
        writer.writerow([path.relative_to(tree).as_posix(), _record_hash(data), len(data)])
    writer.writerow([(dist_info / "RECORD").relative_to(tree).as_posix(), "", ""])
    (dist_info / "RECORD").write_text(record.getvalue())

    name = wheel.name.replace(old_tag, new_tag)
    out = out_dir / name
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in files + [dist_info / "RECORD"]:
            archive.write(path, path.relative_to(tree).as_posix())
    return out


def build(version: str, out: Path, limit_mib: float) -> list[tuple[str, int]]:
    python = find_python(version)
    requirements = pinned_requirements()
    ffcv = next(r for r in requirements if r.startswith("ffcv=="))
    others = [r for r in requirements if r != ffcv]
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work, staging = Path(tmp), Path(tmp) / "out"
        staging.mkdir()
        print(f"building {ffcv} for Python {version} ({python}) ...", flush=True)
        bundle_libraries(build_ffcv(python, ffcv, work), staging, work)
        print(f"fetching {len(others)} wheels for Python {version} ...", flush=True)
        _run([python, "-m", "pip", "wheel", "--no-deps", "--prefer-binary", "-w", str(staging), *others])
        (staging / "requirements.txt").write_text(
            f"# offline install: pip install --no-index --find-links {out.name} -r requirements.txt\n"
            + "\n".join(requirements) + "\n")
        sizes = sorted(((p.name, p.stat().st_size) for p in staging.glob("*.whl")), key=lambda x: -x[1])
        total_mib = sum(size for _, size in sizes) / 2 ** 20
        if total_mib > limit_mib:
            raise WheelhouseError(f"wheelhouse is {total_mib:.1f} MiB, over its {limit_mib:g} MiB limit: "
                                  + ", ".join(f"{n} {s / 2 ** 20:.1f} MiB" for n, s in sizes[:3]))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python acceptance/wheelhouse.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", metavar="X.Y",
                        help=f"Python version of the GPU machine (default 3.12; supported: {', '.join(SUPPORTED_PYTHONS)})")
    parser.add_argument("--out", type=lambda text: Path(output_folder(text)), help="output folder (default: wheelhouse/pyX.Y)")
    parser.add_argument("--limit-mib", type=real(0.0, low_open=True), default=DEFAULT_LIMIT_MIB,
                        help=f"fail when the wheels together exceed this (> 0, default {DEFAULT_LIMIT_MIB:g})")
    parser.add_argument("--print-python", action="store_true",
                        help="only print the path of the interpreter of --python (for the Makefile)")
    args = parser.parse_args(argv)
    if args.print_python:
        try:
            print(find_python(args.python))
        except WheelhouseError as exc:
            print(f"wheelhouse: {exc}", file=sys.stderr)
            return 1
        return 0
    out = args.out or Path("wheelhouse") / f"py{args.python}"
    try:
        sizes = build(args.python, out, args.limit_mib)
    except WheelhouseError as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 1
    for name, size in sizes:
        print(f"{size / 2 ** 20:8.2f} MiB  {name}")
    print(f"{sum(s for _, s in sizes) / 2 ** 20:8.2f} MiB  total in {out} (limit {args.limit_mib:g} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
