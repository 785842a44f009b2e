"""`make gpu-check`: the whole GPU acceptance run as one command, within a time budget (default 8 minutes).

Meant for one short lease of one H100/H200 from a bare checkout plus the wheelhouse (`make wheelhouse`):
    python3 acceptance/gpu_check.py --wheelhouse wheelhouse/py3.12 --out gpu_check_out
It calls the project's own commands as subprocesses, each with its own timeout, keeps going when one
fails (recording the failure), writes OUT/gpu_check.json after every step and prints a table last:

1. environment: Python, torch, triton, timm, the GPU, and every module the project imports. ffcv, zarr,
   numcodecs and google-crc32c, when missing, are installed from the wheelhouse with
   `pip install --no-index --no-deps --target OUT/site` (nothing is fetched); any other missing one is named;
2. CUDA tests: pytest on every test file with CUDA cases;
3. inputs: built-in persons, backgrounds and random PATH-B / PATH-L checkpoints, packed to FFCV and cached
   into one Zarr store per teacher (`cache_teacher demo-data / pack / run`);
4. cached-target vs online-teacher step for path-b_vit-ti and path-l_vit-ti at batch 256, the cached step
   (views rendered ahead) against the same step on views and targets staged on the device, the share of a
   live-feed step spent waiting for data and what an in-line render would cost (`python -m train_student
   bench`); for path-b_vit-ti eager and torch.compile'd (`--compile both`: the measurement that sets the
   GPU default of `--compile`), run last because compiling costs minutes;
5. caching pipeline (double-buffered, and serial) vs teacher forward only (`python -m cache_teacher bench`);
6. kernels: `python -m kernels.bench --json`, first without, then with the torch.compile'd references
   (every kernel against its float64 reference at the recipe shapes, eager / torch.compile / fused time and
   peak memory: whatever rows it reports).

Without a GPU (`--mode tiny`, the default there) the same steps run at toy sizes and few steps, for
path-b_vit-ti only (PATH-L costs minutes on a CPU and runs the same code), and the CUDA tests are only collected: `make test` runs this mode so that the command cannot rot. `--mode full` without a
GPU is refused. This file is a top-level runner: nothing in dpal/, kernels/ or the stages imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the project's argument types (standard library only)
from dpal.arguments import output_folder, real  # noqa: E402

WHEELHOUSE_MODULES = ("ffcv", "zarr", "numcodecs", "google_crc32c")
STEP_KEYS = ("cuda-tests", "train", "cache", "kernels")  # for --only
OLDEST_SUPPORTED = {"torch": (2, 11), "triton": (3, 6), "timm": (1, 0, 23)}  # requirements.txt's lower bounds
# What the project imports at run time that the GPU image is assumed to have (not in the wheelhouse).
IMAGE_MODULES = ("torch", "torchvision", "triton", "timm", "numpy", "numba", "cv2", "PIL", "safetensors", "tqdm",
                 "psutil", "yaml", "packaging", "matplotlib", "pytest")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full GPU run and the tiny CPU run."""
    persons: int
    backgrounds: int
    views_per_image: int
    cache_args: tuple[str, ...]
    train_args: tuple[str, ...]
    kernel_runs: tuple[tuple[str, ...], ...]  # each a kernels.bench argument list, merged in order
    run_cuda_tests: bool
    budget_s: float
    recipes: tuple[str, ...]  # train_student bench runs; each recipe's teacher gets a checkpoint and a store
    compile_recipes: tuple[str, ...]  # of those, the ones also timed with the student compiled (`--compile both`)
    timeout_scale: float  # per-step timeouts are sized for the GPU run; a shared 2-core CPU needs more


FULL = Sizes(persons=512, backgrounds=16, views_per_image=1,
             cache_args=("--iterations", "5"),
             train_args=("--batch-size", "256", "--steps", "10", "--warmup-steps", "2", "--feed-batches", "20",
                         "--calibration-images", "256"),
             # torch.compile of every shape would not fit the budget: the compiled references are timed at
             # the shapes that hold the speed targets.
             kernel_runs=(("--no-compile",), ("--recipe", "path-b_vit-ti", "--no-static")), run_cuda_tests=True,
             budget_s=470,
             recipes=("path-b_vit-ti", "path-l_vit-ti"), compile_recipes=("path-b_vit-ti",), timeout_scale=1.0)
TINY = Sizes(persons=6, backgrounds=2, views_per_image=1,
             cache_args=("--batch-size", "2", "--iterations", "1", "--num-images", "2"),
             train_args=("--batch-size", "2", "--steps", "1", "--warmup-steps", "1", "--feed-batches", "2",
                         "--calibration-images", "2", "--workers", "1", "--feed-workers", "1"),
             # no static report: the end-to-end tests compile the sm_90 sweep once for the whole suite
             kernel_runs=(("--no-compile", "--op", "relation", "--batch", "1", "--no-static"),), run_cuda_tests=False,
             budget_s=1800, recipes=("path-b_vit-ti",),  # PATH-L on a CPU costs minutes; same code as PATH-B
             compile_recipes=(),  # compiling on a 2-core CPU costs minutes (README: measured there once)
             timeout_scale=4.0)


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | skipped
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)


class Runner:
    def __init__(self, out: Path, sizes: Sizes, budget_s: float, mode: str):
        self.out, self.sizes, self.mode = out, sizes, mode
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.steps: list[Step] = []
        self.report: dict = {"mode": mode, "budget_s": budget_s, "steps": []}
        # The run's explicit kernel mode, inherited by every command: compiled on the GPU, Triton's interpreter
        # in the tiny CPU mode (`kernels.select_interpreter` keeps it).
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0" if mode == "full" else "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    # ------------------------------------------------------------------ plumbing
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def cli(self, log_name: str, args: list[str], timeout: float) -> tuple[int, str]:
        """Run `python ARGS` in the repository with the prepared environment; output to logs/LOG_NAME.log.
        Returns (exit status, last lines); on a timeout the whole process group is killed (status 124)."""
        timeout = max(1.0, min(timeout * self.sizes.timeout_scale, self.remaining()))
        log_path = self.logs / f"{log_name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = 124
                with open(log_path, "a") as more:
                    more.write(f"\n[gpu-check] killed after its {timeout:.0f} s timeout\n")
        tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
        return rc, "\n".join(tail)

    def step(self, name: str, needs: tuple[str, ...] = ()):
        """`with runner.step(name) as step:` runs one step; `step` is None when it is skipped (a needed step is
        not ok, or the budget is spent). An exception inside is recorded as the step's failure, and the run goes on."""
        return _StepContext(self, name, needs)

    def status_of(self, name: str) -> str | None:
        return next((s.status for s in self.steps if s.name == name), None)

    def save(self) -> None:
        self.report["steps"] = [asdict(s) for s in self.steps]
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps(self.report, indent=2) + "\n")


class _StepContext:
    def __init__(self, runner: Runner, name: str, needs: tuple[str, ...]):
        self.runner, self.step = runner, Step(name)
        runner.steps.append(self.step)
        missing = [n for n in needs if runner.status_of(n) != "ok"]
        if missing:
            self.skip = f"needs {', '.join(missing)}"
        elif runner.remaining() < 5:
            self.skip = "time budget spent"
        else:
            self.skip = None

    def __enter__(self) -> Step | None:
        self.start = time.monotonic()
        index = len(self.runner.steps)
        print(f"[gpu-check] {index}. {self.step.name} ...", file=sys.stderr, flush=True)
        if self.skip:
            self.step.status, self.step.detail = "skipped", self.skip
            return None
        return self.step

    def __exit__(self, exc_type, exc, tb) -> bool:
        step = self.step
        step.seconds = round(time.monotonic() - self.start, 1)
        if exc is not None:
            if not isinstance(exc, Exception):
                return False  # Ctrl-C and exits stop the run
            step.status = "failed"
            step.detail = str(exc) if isinstance(exc, StepFailed) else f"{exc_type.__name__}: {exc}"
        elif step.status == "pending":
            step.status = "ok"
        print(f"[gpu-check]    {step.status} ({step.seconds:.1f} s) {step.detail.splitlines()[0] if step.detail else ''}",
              file=sys.stderr, flush=True)
        self.runner.save()
        return True  # a failed step is recorded, the run goes on


class StepFailed(Exception):
    pass


def _require(rc: int, what: str, tail: str) -> None:
    if rc != 0:
        reason = "timed out" if rc == 124 else f"exit status {rc}"
        raise StepFailed(f"{what} {reason}; last output:\n{tail}")


# ---------------------------------------------------------------------- steps
PROBE = """
import importlib, json, platform
info = {"python": platform.python_version(), "missing": {}}
for name in %r:
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "present")
    except Exception as exc:
        info["missing"][name] = f"{type(exc).__name__}: {exc}"
if "torch" in info:
    import torch
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps(info))
"""


def probe(runner: Runner) -> dict:
    """Versions of, and import errors for, every module the project needs (one fresh interpreter)."""
    done = subprocess.run([sys.executable, "-c", PROBE % ((*IMAGE_MODULES, *WHEELHOUSE_MODULES),)],
                          capture_output=True, text=True, env=runner.env, cwd=REPO, timeout=300)
    if done.returncode != 0:
        raise StepFailed(f"the probe of the installed packages failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_environment(runner: Runner, step: Step, wheelhouse: Path | None) -> None:
    """Versions and GPU; ffcv/zarr/numcodecs/google-crc32c installed from the wheelhouse when missing."""
    info = probe(runner)
    missing = [name for name in WHEELHOUSE_MODULES if name in info["missing"]]
    if missing:
        if wheelhouse is None:
            raise StepFailed(f"missing {', '.join(missing)} and no --wheelhouse given: build one with "
                             "`make wheelhouse` and pass it")
        site = runner.out / "site"
        rc, tail = runner.cli("pip-install", ["-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                              "--no-compile", "--upgrade", "--target", str(site), "--find-links",
                                              str(wheelhouse), "-r", str(wheelhouse / "requirements.txt")], 180)
        _require(rc, "pip install from the wheelhouse", tail)
        runner.env["PYTHONPATH"] = os.pathsep.join([runner.env["PYTHONPATH"], str(site)])
        info = probe(runner)
        info["installed_from_wheelhouse"] = missing
    runner.report["environment"] = {**info, "machine": platform.machine(), "cpus": os.cpu_count()}
    step.figures = info
    step.detail = (f"{info.get('gpu') or 'no GPU'}; Python {info['python']}, torch {info.get('torch')}, "
                   f"triton {info.get('triton')}, timm {info.get('timm')}"
                   + (f"; installed {', '.join(missing)} from {wheelhouse}" if missing else ""))
    if info["missing"]:
        raise StepFailed("cannot import: " + "; ".join(f"{k} ({v})" for k, v in info["missing"].items()))
    too_old = [f"{name} {info[name]} (needs >= {'.'.join(map(str, oldest))})"
               for name, oldest in OLDEST_SUPPORTED.items() if _version(info[name]) < oldest]
    if too_old:
        raise StepFailed(f"older than supported: {', '.join(too_old)}")


def _version(text: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _teacher(recipe: str) -> str:
    return recipe.split("_")[0]


def prepare_inputs(runner: Runner, step: Step, sizes: Sizes) -> dict:
    """Persons and backgrounds (written with the first teacher's demo data), packed once; a random checkpoint
    and a store for each teacher the recipes need."""
    data = runner.out / "data"
    teachers = list(dict.fromkeys(_teacher(r) for r in sizes.recipes))
    paths = {"images": data / "persons.beton", "backgrounds": data / "backgrounds.beton",
             "weights": {t: data / t / f"{t}.pth" for t in teachers}, "store": {t: data / f"{t}.zarr" for t in teachers}}
    commands = []
    for index, teacher in enumerate(teachers):
        counts = (sizes.persons, sizes.backgrounds) if index == 0 else (1, 1)  # later teachers: checkpoint only
        commands.append((f"demo-data-{teacher}", ["-m", "cache_teacher", "demo-data", str(data / teacher), "--teacher",
                                                  teacher, "--persons", str(counts[0]), "--backgrounds", str(counts[1])]))
    for name in ("persons", "backgrounds"):
        commands.append((f"pack-{name}", ["-m", "cache_teacher", "pack", str(data / teachers[0] / name),
                                          str(paths["images" if name == "persons" else "backgrounds"])]))
    for teacher in teachers:
        commands.append((f"cache-run-{teacher}", [
            "-m", "cache_teacher", "run", "--teacher", teacher, "--weights", str(paths["weights"][teacher]),
            "--images", str(paths["images"]), "--backgrounds", str(paths["backgrounds"]), "--views-per-image",
            str(sizes.views_per_image), "--calibration-images", str(min(64, sizes.persons)), "--no-progress",
            "--out", str(paths["store"][teacher])]))
    for name, args in commands:
        started = time.monotonic()
        rc, tail = runner.cli(name, args, 240)
        step.figures[f"{name}_s"] = round(time.monotonic() - started, 1)
        _require(rc, f"`python {' '.join(args[:3])}`", tail)
    step.detail = (f"{sizes.persons} persons, {sizes.views_per_image} view set(s) each; stores for "
                   f"{', '.join(teachers)}")
    return paths


CUDA_CASE = re.compile(r'pytest\.mark\.cuda\b|not torch\.cuda\.is_available\(\)'
                       r'|"cuda" if torch\.cuda\.is_available\(\)')


def cuda_test_files() -> list[str]:
    """Every test file with CUDA cases (skipped without CUDA, or run on it when there is one); new ones join
    by themselves."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if CUDA_CASE.search(p.read_text()))


def run_cuda_tests(runner: Runner, step: Step, run_them: bool) -> None:
    files = cuda_test_files()
    junit = runner.out / "cuda_tests.xml"
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    if not run_them:
        args.append("--collect-only")
    rc, tail = runner.cli("cuda-tests", args, 240)
    counts = {"files": len(files)}
    if run_them and junit.is_file():
        suite = ElementTree.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    else:  # --collect-only reports no tests in the XML; its last line says "N tests collected in ..."
        collected = re.search(r"(\d+) tests? collected", tail)
        counts["collected"] = int(collected.group(1)) if collected else 0
    step.figures = counts
    if run_them:
        counts["passed"] = counts.get("tests", 0) - counts.get("failures", 0) - counts.get("errors", 0) \
            - counts.get("skipped", 0)
        step.detail = (f"{counts.get('passed', 0)} passed, {counts.get('failures', 0) + counts.get('errors', 0)} "
                       f"failed, {counts.get('skipped', 0)} skipped in {len(files)} files")
    else:
        step.detail = f"collected only (no GPU): {len(files)} files"
    _require(rc, "pytest", tail)


def _kernel_row_key(row: dict) -> str:
    return json.dumps([row.get("op"), row.get("shape"), row.get("impl")], sort_keys=True)


def run_kernel_bench(runner: Runner, step: Step, runs: tuple[tuple[str, ...], ...]) -> None:
    """kernels.bench once per argument list; later runs' rows replace earlier ones with the same key."""
    rows: dict[str, dict] = {}
    failures = []
    for index, extra in enumerate(runs):
        report = runner.out / f"kernels_{index}.json"
        rc, tail = runner.cli(f"kernels-bench-{index}", ["-m", "kernels.bench", "--json", str(report), *extra],
                              300)
        if rc != 0 or not report.is_file():
            failures.append(f"kernels.bench {' '.join(extra) or '(all)'}: "
                            + ("timed out" if rc == 124 else f"exit status {rc}") + f"\n{tail}")
            continue
        data = json.loads(report.read_text())
        runner.report.setdefault("kernels_meta", {}).update(
            {k: v for k, v in data.items() if k not in ("results",)})
        for row in data.get("results", []):
            rows[_kernel_row_key(row)] = row
    runner.report["kernels"] = list(rows.values())
    errors = [r for r in rows.values() if r.get("error")]
    bad_accuracy = [r for r in rows.values() if _accuracy(r)[1]]
    step.figures = {"rows": len(rows), "errors": len(errors), "nan_rows": len(bad_accuracy)}
    step.detail = f"{len(rows)} rows, {len(errors)} with errors, {len(bad_accuracy)} with NaN"
    if failures and not rows:
        raise StepFailed("; ".join(failures))
    if failures:
        step.status, step.detail = "failed", step.detail + "; " + "; ".join(f.splitlines()[0] for f in failures)
    elif errors or bad_accuracy:
        step.status = "failed"


def _accuracy(row: dict) -> tuple[float | None, bool | None]:
    """(largest relative error the row reports, whether it reports a NaN), from whatever keys it has; None
    where it has no such key (kernels.bench's rows grow: read them defensively)."""
    flat = {**(row.get("extra") or {}), **{k: v for k, v in row.items() if k != "extra"}}
    errors = [v for k, v in flat.items() if "rel" in k and "err" in k and isinstance(v, (int, float))]
    flags = [bool(v) for k, v in flat.items() if "nan" in k.lower() and isinstance(v, (bool, int))]
    if not errors and not flags:
        return None, None
    return (max(errors) if errors else None), any(flags) or any(v != v for v in errors)


def run_cache_bench(runner: Runner, step: Step, paths: dict, sizes: Sizes) -> None:
    report = runner.out / "cache_bench.json"
    rc, tail = runner.cli("cache-bench", ["-m", "cache_teacher", "bench", "--teacher", "path-b", "--weights",
                                          str(paths["weights"]["path-b"]), "--images", str(paths["images"]),
                                          "--backgrounds", str(paths["backgrounds"]), "--json", str(report),
                                          *sizes.cache_args], 180)
    _require(rc, "cache_teacher bench", tail)
    step.figures = json.loads(report.read_text())
    f = step.figures
    step.detail = (f"pipeline {f['pipeline_view_sets_per_s']:.1f} vs teacher-only {f['teacher_only_view_sets_per_s']:.1f} "
                   f"view sets/s ({100 * f['pipeline_fraction']:.0f}%; serial {100 * f['serial_fraction']:.0f}%), "
                   f"batch {f['batch_size']}")


def run_train_bench(runner: Runner, step: Step, recipe: str, paths: dict, sizes: Sizes) -> None:
    teacher = _teacher(recipe)
    report = runner.out / f"train_bench_{recipe}.json"
    rc, tail = runner.cli(f"train-bench-{recipe}", [
        "-m", "train_student", "bench", "--recipe", recipe, "--store", str(paths["store"][teacher]),
        "--images", str(paths["images"]), "--backgrounds", str(paths["backgrounds"]), "--teacher-weights",
        str(paths["weights"][teacher]), "--out", str(report), *sizes.train_args,
        *(("--compile", "both") if recipe in sizes.compile_recipes else ())],
        420 if recipe in sizes.compile_recipes else 300)
    _require(rc, "train_student bench", tail)
    step.figures = json.loads(report.read_text())
    f = step.figures
    step.detail = (f"cached {f.get('cached_step_samples_per_s', 0):.1f} ({100 * f.get('cached_vs_staged', 0):.0f}% of "
                   f"staged) vs online {f.get('online_step_samples_per_s', 0):.1f} samples/s"
                   + (f"; compiled {f['compile_speedup']:.2f}x" if "compile_speedup" in f else ""))


# ---------------------------------------------------------------------- table
def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(runner: Runner) -> None:
    rows = runner.report.get("kernels") or []
    if rows:
        print(f"\nkernels (kernels.bench; {runner.report.get('kernels_meta', {}).get('device', '?')})")
        print(f"{'op':9} {'shape':40} {'impl':16} {'ms':>9} {'peak MiB':>9} {'max rel err':>11} {'NaN':>4}  error")
        for row in sorted(rows, key=lambda r: (r.get("op", ""), json.dumps(r.get("shape"), sort_keys=True),
                                               r.get("impl", ""))):
            shape = " ".join(f"{k}={v}" for k, v in (row.get("shape") or {}).items() if k != "dtype")
            rel, nan = _accuracy(row)
            print(f"{row.get('op', '?'):9} {shape[:40]:40} {str(row.get('impl', '?'))[:16]:16} "
                  f"{_num(row.get('ms'), '9.3f'):>9} {_num(row.get('peak_mib'), '9.1f'):>9} "
                  f"{_num(rel, '11.2e'):>11} {'-' if nan is None else 'yes' if nan else 'no':>4}  {row.get('error') or ''}")
    env = runner.report.get("environment", {})
    print(f"\ngpu-check ({runner.mode} mode): {env.get('gpu') or 'no GPU'}, Python {env.get('python', '?')}, "
          f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, timm {env.get('timm', '?')}; "
          f"{runner.report.get('elapsed_s', 0):.0f} s of {runner.budget_s:.0f} s")
    print(f"| {'step':<24} | {'status':<7} | {'s':>6} | result")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 8}|{'-' * 60}")
    for s in runner.steps:
        print(f"| {s.name:<24} | {s.status:<7} | {s.seconds:6.1f} | {s.detail.splitlines()[0] if s.detail else ''}")
    train = [(s.name.removeprefix("train "), s.figures) for s in runner.steps
             if s.name.startswith("train ") and s.status == "ok"]
    if train:
        print(f"\n| {'recipe':<14} | {'batch':>5} | {'cached /s':>10} | {'staged /s':>10} | {'cached/staged':>13} | "
              f"{'online /s':>10} | {'speed-up':>8} | {'live /s':>9} | {'data wait':>9} | {'render':>7} | "
              f"{'compiled /s':>11} | {'compile':>7} |")
        print(f"|{'-' * 16}|{'-' * 7}|{'-' * 12}|{'-' * 12}|{'-' * 15}|{'-' * 12}|{'-' * 10}|{'-' * 11}|{'-' * 11}|"
              f"{'-' * 9}|{'-' * 13}|{'-' * 9}|")
        for recipe, f in train:
            wait, render, ratio = f.get("data_wait_share"), f.get("render_share"), f.get("cached_vs_staged")
            print(f"| {recipe:<14} | {f.get('batch', 0):>5} | {_num(f.get('cached_step_samples_per_s'), '10.1f')} | "
                  f"{_num(f.get('staged_step_samples_per_s'), '10.1f')} | "
                  f"{_num(None if ratio is None else 100 * ratio, '12.1f')}% | "
                  f"{_num(f.get('online_step_samples_per_s'), '10.1f')} | {_num(f.get('speedup'), '7.2f')}x | "
                  f"{_num(f.get('live_step_samples_per_s'), '9.1f')} | "
                  f"{_num(None if wait is None else 100 * wait, '8.1f')}% | "
                  f"{_num(None if render is None else 100 * render, '6.1f')}% | "
                  f"{_num(f.get('compiled_cached_step_samples_per_s'), '11.1f')} | "
                  f"{_num(f.get('compile_speedup'), '6.2f')}x |")
        print("cached/staged: target >= 95%; render: an in-line render's cost relative to the staged step "
              "(target <= 10%); compile: compiled cached step / eager cached step (sets --compile's GPU default)")
    failed = [s.name for s in runner.steps if s.status != "ok"]
    print(f"\n{len(runner.steps) - len(failed)} of {len(runner.steps)} steps ok"
          + (f"; not ok: {', '.join(failed)} (logs in {runner.logs})" if failed else "")
          + f"; JSON: {runner.out / 'gpu_check.json'}")


# ---------------------------------------------------------------------- main
def _has_gpu() -> bool:
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)
    return done.stdout.strip().endswith("True")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python acceptance/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("auto", "full", "tiny"), default="auto",
                        help="full: recipe shapes on a CUDA GPU; tiny: toy sizes on the CPU (auto: full when a GPU is visible)")
    parser.add_argument("--wheelhouse", type=Path, help="folder from `make wheelhouse`, used when ffcv/zarr/numcodecs "
                        "are not importable (installed into OUT/site, offline)")
    parser.add_argument("--out", type=lambda text: Path(output_folder(text)), default=Path("gpu_check_out"),
                        help="results folder (default gpu_check_out)")
    parser.add_argument("--budget-s", type=real(0.0, low_open=True),
                        help="overall time budget in seconds (> 0; default: 470 full, 1800 tiny)")
    parser.add_argument("--only", metavar="STEP,...", help=f"run only these of {', '.join(STEP_KEYS)} (the environment "
                        "step always runs, and the inputs when train or cache needs them); default: all")
    args = parser.parse_args(argv)
    only = set(STEP_KEYS) if args.only is None else set(args.only.split(","))
    if not only <= set(STEP_KEYS):
        parser.error(f"--only: unknown step(s) {', '.join(sorted(only - set(STEP_KEYS)))}; "
                     f"known: {', '.join(STEP_KEYS)}")

    has_gpu = _has_gpu()
    mode = args.mode if args.mode != "auto" else ("full" if has_gpu else "tiny")
    if mode == "full" and not has_gpu:
        print("gpu-check: --mode full needs a CUDA GPU and torch.cuda.is_available() is False here; "
              "use --mode tiny (or auto) on a CPU", file=sys.stderr)
        return 2
    if args.wheelhouse is not None and not (args.wheelhouse / "requirements.txt").is_file():
        print(f"gpu-check: {args.wheelhouse} is not a wheelhouse (no requirements.txt in it): build one with "
              "`make wheelhouse` on a machine with a registry and bring it along", file=sys.stderr)
        return 2
    sizes = FULL if mode == "full" else TINY
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, sizes, args.budget_s or sizes.budget_s, mode)

    with runner.step("environment") as step:
        if step:
            check_environment(runner, step, args.wheelhouse)
    if "cuda-tests" in only:
        with runner.step("CUDA tests", needs=("environment",)) as step:
            if step:
                run_cuda_tests(runner, step, sizes.run_cuda_tests)
    paths: dict = {}
    if only & {"train", "cache"}:
        with runner.step("inputs", needs=("environment",)) as step:
            if step:
                paths = prepare_inputs(runner, step, sizes)

    def train(compiled_too: bool) -> None:
        for recipe in sizes.recipes if "train" in only else ():
            if (recipe in sizes.compile_recipes) == compiled_too:
                with runner.step(f"train {recipe}", needs=("inputs",)) as step:
                    if step:
                        run_train_bench(runner, step, recipe, paths, sizes)

    train(compiled_too=False)
    if "cache" in only:
        with runner.step("cache pipeline", needs=("inputs",)) as step:
            if step:
                run_cache_bench(runner, step, paths, sizes)
    if "kernels" in only:
        with runner.step("kernels", needs=("environment",)) as step:
            if step:
                run_kernel_bench(runner, step, sizes.kernel_runs)
    train(compiled_too=True)  # last: compiling costs minutes and must not starve the other measurements
    runner.save()
    print_tables(runner)
    return 0 if all(s.status == "ok" for s in runner.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
