"""`make gpu-check`: the whole GPU acceptance run as one command, ordered by value, within a time budget.

On a CUDA machine, from a checkout plus the wheelhouse (`make wheelhouse`):
    python3 acceptance/gpu_check.py --wheelhouse wheelhouse/py3.12 --out gpu_check_out
It calls the project's own commands as subprocesses, each capped by its step's share of the budget, keeps
going when one fails (recording why), and writes every result into OUT the moment it exists: OUT/gpu_check.json
after every step, each benchmark row as it is measured, each test file's results as it finishes, and the logs
packed into OUT/logs.tar.gz after every step. A run killed at any point leaves everything measured before.
Inputs, checkpoints and installed wheels go to a work folder beside OUT (--work), never into OUT. The order
(most valuable first; full-mode caps in seconds, each also bounded by what is left of the budget):

1. environment (60): every version (Python, torch, triton, timm, numpy, glibc, driver, GPU name, clocks) and
   every module the project imports. What the image lacks, or has too old (timm below 1.0.23), is installed
   from the wheelhouse into the work folder (offline); what is still missing only skips the steps that need it;
2. kernels at the path-b_vit-ti calls (170): `kernels.bench` for the decoder's L = 257 and stacked-CLS
   (B = 768, L = 1) calls and the relation loss with fp16 and int8 targets: eager, eager under bf16 autocast,
   torch.compile under bf16 autocast, fused; the fused rows beside `kernels.cost_model`'s prediction priced at
   the ceilings the bench measures first (L2 read probe, copy, GEMM);
3. inputs (90): built-in persons and backgrounds, packed, and a random PATH-B checkpoint cached into a store;
4. train path-b_vit-ti (120): `train_student bench`, the cached vs staged vs online step;
5. CUDA tests (150): only the cases that run on CUDA (`pytest --cuda-cases`), one process per test file; a
   file whose process dies (a compiler abort) is rerun one case per process, so an abort costs one case;
6. the rest, as the budget allows: the kernels at every recipe's calls without torch.compile, the caching
   pipeline, PATH-L's inputs and train step, and last the path-b_vit-ti step with the student compiled.

Without a GPU (`--mode tiny`, the default there) the same steps run at toy sizes in Triton's interpreter and the
CUDA tests are only collected: the tests run this mode so that the command cannot rot. `--mode full` without a
GPU is refused. This file is a top-level runner: nothing in dpal/, kernels/ or the stages imports it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the project's argument types (standard library only)
from runtime.arguments import output_folder, real  # noqa: E402

WHEELHOUSE_MODULES = {"ffcv": "ffcv", "zarr": "zarr", "numcodecs": "numcodecs", "google_crc32c": "google-crc32c"}
STEP_KEYS = ("kernels", "train", "cuda-tests", "cache")  # for --only
OLDEST_SUPPORTED = {"torch": (2, 11), "triton": (3, 6), "timm": (1, 0, 23)}  # requirements.txt's lower bounds
TESTED_NUMPY = ((2, 0), (2, 6))  # requirements.txt's numpy range [low, high)
# What the project imports at run time that the GPU image is assumed to have (not in the wheelhouse).
IMAGE_MODULES = ("torch", "torchvision", "triton", "timm", "numpy", "numba", "cv2", "PIL", "safetensors", "tqdm",
                 "psutil", "yaml", "packaging", "matplotlib", "pytest")
# Modules each kind of step imports (beyond Python itself): a step whose modules are missing is skipped.
KERNEL_MODULES = ("torch", "triton", "numpy")
STAGE_MODULES = IMAGE_MODULES + tuple(WHEELHOUSE_MODULES)
TEST_MODULES = ("torch", "triton", "numpy", "pytest", "timm", "torchvision")
TARGET_RECIPE = "path-b_vit-ti"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full GPU run and the tiny CPU run."""
    persons: int
    backgrounds: int
    views_per_image: int
    cache_args: tuple[str, ...]
    train_args: tuple[str, ...]
    first_kernels: tuple[str, ...]  # kernels.bench arguments of step 2
    more_kernels: tuple[str, ...]  # kernels.bench arguments of the later kernel step
    run_cuda_tests: bool
    budget_s: float
    more_recipes: tuple[str, ...]  # train_student bench runs after the target recipe's, as the budget allows
    compile_target: bool  # time the target recipe's step with the student compiled, last
    caps: dict  # step kind -> seconds


FULL = Sizes(persons=512, backgrounds=16, views_per_image=1,
             cache_args=("--iterations", "5"),
             train_args=("--batch-size", "256", "--steps", "10", "--warmup-steps", "2", "--feed-batches", "20",
                         "--calibration-images", "256"),
             first_kernels=("--recipe", TARGET_RECIPE, "--tokens", "1,257", "--no-static",
                            "--impls", "eager,eager_autocast,compile_autocast,fused"),
             more_kernels=("--no-compile", "--no-static"), run_cuda_tests=True, budget_s=470,
             more_recipes=("path-l_vit-ti",), compile_target=True,
             caps={"environment": 60, "kernels": 170, "inputs": 90, "train": 120, "cuda-tests": 150,
                   "more-kernels": 120, "cache": 60, "compiled": 240})
TINY = Sizes(persons=4, backgrounds=2, views_per_image=1,
             cache_args=("--batch-size", "2", "--iterations", "1", "--num-images", "2"),
             train_args=("--batch-size", "2", "--steps", "1", "--warmup-steps", "0", "--feed-batches", "2",
                         "--calibration-images", "2", "--workers", "1", "--feed-workers", "1"),
             first_kernels=("--op", "relation", "--batch", "1", "--no-static", "--impls", "eager,fused"),
             more_kernels=("--op", "decoder", "--batch", "1", "--no-compile", "--no-static"),
             run_cuda_tests=False, budget_s=1800,
             more_recipes=(),  # PATH-L on a CPU costs minutes and runs the same code as PATH-B
             compile_target=False,  # compiling on a 2-core CPU costs minutes
             # A shared 2-core CPU needs more than the GPU run's shares.
             caps={"environment": 240, "kernels": 400, "inputs": 600, "train": 600, "cuda-tests": 300,
                   "more-kernels": 400, "cache": 400, "compiled": 600})


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | skipped
    cap: float = 0.0  # its share of the budget, seconds
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)


def _die_with_parent() -> None:
    """In a child, before exec: be killed when the runner dies, so that killing the run stops its command."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Runner:
    def __init__(self, out: Path, work: Path, sizes: Sizes, budget_s: float, mode: str):
        self.out, self.work, self.sizes, self.mode = out, work, sizes, mode
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.steps: list[Step] = []
        self.missing: dict[str, str] = {}  # module -> why it cannot be imported (after the environment step)
        self.report: dict = {"mode": mode, "budget_s": budget_s, "steps": []}
        # The run's explicit kernel mode, inherited by every command: compiled on the GPU, Triton's interpreter
        # in the tiny CPU mode (`kernels.select_interpreter` keeps it).
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0" if mode == "full" else "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    # ------------------------------------------------------------------ plumbing
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def cli(self, log_name: str, args: list[str], cap: float) -> tuple[int, str]:
        """Run `python ARGS` in the repository with the prepared environment, for at most `cap` seconds (and what
        is left of the budget); output to logs/LOG_NAME.log. Returns (exit status, last lines); on a timeout the
        whole process group is killed (status 124)."""
        timeout = max(1.0, min(cap, self.remaining()))
        log_path = self.logs / f"{log_name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = 124
                with open(log_path, "a") as more:
                    more.write(f"\n[gpu-check] killed after its {timeout:.0f} s share of the budget\n")
        tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
        return rc, "\n".join(tail)

    def step(self, name: str, cap_key: str, needs: tuple[str, ...] = (), modules: tuple[str, ...] = ()):
        """`with runner.step(name, cap_key) as step:` runs one step; `step` is None when it is skipped (a needed
        step is not ok, a module it imports is missing, or the budget is spent). An exception inside is recorded
        as the step's failure, and the run goes on. `step.cap` is its share of the budget in seconds."""
        return _StepContext(self, name, self.sizes.caps[cap_key], needs, modules)

    def status_of(self, name: str) -> str | None:
        return next((s.status for s in self.steps if s.name == name), None)

    def save(self) -> None:
        """gpu_check.json and logs.tar.gz, each replaced atomically: what a kill leaves is whole."""
        self.report["steps"] = [asdict(s) for s in self.steps]
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        _replace(self.out / "gpu_check.json", lambda f: f.write((json.dumps(self.report, indent=2) + "\n").encode()))

        def pack(f):
            with tarfile.open(fileobj=f, mode="w:gz") as archive:
                archive.add(self.logs, arcname="logs")
        _replace(self.out / "logs.tar.gz", pack)


def _replace(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        write(f)
    os.replace(partial, path)


class _StepContext:
    def __init__(self, runner: Runner, name: str, cap: float, needs: tuple[str, ...], modules: tuple[str, ...]):
        self.runner, self.step = runner, Step(name, cap=cap)
        runner.steps.append(self.step)
        missing_steps = [n for n in needs if runner.status_of(n) != "ok"]
        missing_modules = [m for m in modules if m in runner.missing]
        if missing_steps:
            self.skip = f"needs {', '.join(missing_steps)}"
        elif missing_modules:
            self.skip = f"cannot import {', '.join(missing_modules)}"
        elif runner.remaining() < 5:
            self.skip = "time budget spent"
        else:
            self.skip = None

    def __enter__(self) -> Step | None:
        self.start = time.monotonic()
        print(f"[gpu-check] {len(self.runner.steps)}. {self.step.name} ...", file=sys.stderr, flush=True)
        if self.skip:
            self.step.status, self.step.detail = "skipped", self.skip
            return None
        self.runner.save()  # a run killed inside this step shows it "pending"
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
        last = tail.splitlines()[-1].strip() if tail else ""
        raise StepFailed(f"{what} {reason}: {last[-160:]}\nlast output:\n{tail}")  # the table shows the first line


# ---------------------------------------------------------------------- environment
PROBE = """
import importlib, json, platform
info = {"python": platform.python_version(), "glibc": "-".join(platform.libc_ver()), "missing": {}}
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
    if info["gpu"]:
        info["capability"] = "sm_%%d%%d" %% torch.cuda.get_device_capability(0)
print(json.dumps(info))
"""
NVIDIA_SMI_FIELDS = ("driver_version", "name", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
                     "power.limit", "temperature.gpu")


def probe(runner: Runner) -> dict:
    """Versions of, and import errors for, every module the project needs (one fresh interpreter)."""
    done = subprocess.run([sys.executable, "-c", PROBE % ((*IMAGE_MODULES, *WHEELHOUSE_MODULES),)],
                          capture_output=True, text=True, env=runner.env, cwd=REPO, timeout=max(5, runner.remaining()))
    with open(runner.logs / "environment.log", "a") as log:
        log.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise StepFailed(f"the probe of the installed packages failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def nvidia_smi() -> dict:
    """Driver, GPU name, memory, clocks, power limit and temperature as nvidia-smi reports them ({} without one)."""
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0 or not done.stdout.strip():
        return {}
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
    return {f"nvidia_smi.{k}": v for k, v in zip(NVIDIA_SMI_FIELDS, values)}


def _version(text: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); () for what carries no version."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _too_old(info: dict) -> dict[str, str]:
    return {name: f"{info[name]} (needs >= {'.'.join(map(str, oldest))})" for name, oldest in OLDEST_SUPPORTED.items()
            if name in info and _version(info[name]) < oldest}


def check_environment(runner: Runner, step: Step, wheelhouse: Path | None) -> None:
    """Every version found, recorded; what the image lacks or has too old installed from the wheelhouse into
    the work folder; whatever is still missing is recorded for the steps that need it, and never stops the run."""
    info = probe(runner)
    wanted = [WHEELHOUSE_MODULES[m] for m in WHEELHOUSE_MODULES if m in info["missing"]]
    wanted += [name for name in _too_old(info) if name == "timm"]  # torch/triton come with the image only
    notes = []
    if wanted and wheelhouse is None:
        notes.append(f"no --wheelhouse for {', '.join(wanted)} (build one with `make wheelhouse`)")
    elif wanted:
        # Everything the wheelhouse holds (the wanted modules' dependencies too), timm only when the image's is too old.
        pins = [line for line in (wheelhouse / "requirements.txt").read_text().splitlines()
                if line.strip() and (re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower() != "timm" or "timm" in wanted)]
        site = runner.work / "site"
        rc, tail = runner.cli("pip-install", ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                              "--upgrade", "--target", str(site), "--find-links", str(wheelhouse),
                                              *pins], step.cap)
        if rc == 0:  # before the image's site-packages, so that a wheelhouse timm wins over a too-old one
            runner.env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site), runner.env["PYTHONPATH"]])
            info = probe(runner)
            info["installed_from_wheelhouse"] = [m for m in WHEELHOUSE_MODULES if WHEELHOUSE_MODULES[m] in wanted] \
                + [n for n in wanted if n not in WHEELHOUSE_MODULES.values()]
        else:
            notes.append(f"pip install from the wheelhouse failed: {tail.splitlines()[-1] if tail else rc}")
    info |= nvidia_smi()
    too_old = _too_old(info)
    runner.missing = dict(info["missing"]) | {name: f"too old: {why}" for name, why in too_old.items()}
    if "numpy" in info and not TESTED_NUMPY[0] <= _version(info["numpy"])[:2] < TESTED_NUMPY[1]:
        low, high = (".".join(map(str, bound)) for bound in TESTED_NUMPY)
        notes.append(f"numpy {info['numpy']} is outside the tested range (>= {low}, < {high})")
    runner.report["environment"] = {**info, "machine": platform.machine(), "cpus": os.cpu_count()}
    step.figures = info
    step.detail = "; ".join(
        [f"{info.get('gpu') or 'no GPU'}; Python {info['python']}, torch {info.get('torch')}, triton "
         f"{info.get('triton')}, timm {info.get('timm')}, numpy {info.get('numpy')}"]
        + ([f"installed {', '.join(info['installed_from_wheelhouse'])} from {wheelhouse}"]
           if "installed_from_wheelhouse" in info else [])
        + ([f"missing (steps that need them are skipped): {', '.join(sorted(runner.missing))}"] if runner.missing
           else []) + notes)


# ---------------------------------------------------------------------- steps
def _teacher(recipe: str) -> str:
    return recipe.split("_")[0]


def prepare_inputs(runner: Runner, step: Step, sizes: Sizes, teacher: str, paths: dict) -> None:
    """Persons and backgrounds (written and packed with the first teacher's demo data), a random checkpoint
    of `teacher` and its store; fills `paths`."""
    data = runner.work / "data"
    first = "images" not in paths
    paths.setdefault("images", data / "persons.beton")
    paths.setdefault("backgrounds", data / "backgrounds.beton")
    paths.setdefault("weights", {})[teacher] = data / teacher / f"{teacher}.pth"
    paths.setdefault("store", {})[teacher] = data / f"{teacher}.zarr"
    counts = (sizes.persons, sizes.backgrounds) if first else (1, 1)  # later teachers: the checkpoint only
    commands = [(f"demo-data-{teacher}", ["-m", "cache_teacher", "demo-data", str(data / teacher), "--teacher",
                                          teacher, "--persons", str(counts[0]), "--backgrounds", str(counts[1])])]
    if first:
        commands += [(f"pack-{name}", ["-m", "cache_teacher", "pack", str(data / teacher / name), str(paths[key])])
                     for name, key in (("persons", "images"), ("backgrounds", "backgrounds"))]
    commands.append((f"cache-run-{teacher}", [
        "-m", "cache_teacher", "run", "--teacher", teacher, "--weights", str(paths["weights"][teacher]),
        "--images", str(paths["images"]), "--backgrounds", str(paths["backgrounds"]), "--views-per-image",
        str(sizes.views_per_image), "--calibration-images", str(min(64, sizes.persons)), "--no-progress",
        "--out", str(paths["store"][teacher])]))
    until = time.monotonic() + step.cap
    for name, args in commands:
        started = time.monotonic()
        rc, tail = runner.cli(name, args, until - started)
        step.figures[f"{name}_s"] = round(time.monotonic() - started, 1)
        _require(rc, f"`python {' '.join(args[:3])}`", tail)
    step.detail = f"{sizes.persons} persons, {sizes.views_per_image} view set(s) each; a store for {teacher}"


CUDA_CASE = re.compile(r'not torch\.cuda\.is_available\(\)|"cuda" if torch\.cuda\.is_available\(\)|mark\.cuda\b')


def cuda_test_files() -> list[str]:
    """Every test file with CUDA cases (skipped without CUDA, marked `cuda`, or run on it when there is one);
    new ones join by themselves."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if CUDA_CASE.search(p.read_text()))


def _junit_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def run_cuda_tests(runner: Runner, step: Step, run_them: bool) -> None:
    """The CUDA cases, one pytest process per file; a file whose process dies without its results (a compiler
    abort) is rerun one case per process. Each file's (or case's) JUnit XML lands in OUT/cuda_tests/ as it ends.
    Without a GPU (`run_them` False) one process only collects them all."""
    files = cuda_test_files()
    results = runner.out / "cuda_tests"
    results.mkdir(exist_ok=True)
    base = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--cuda-cases"]
    until = time.monotonic() + step.cap
    totals = {"files": len(files), "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "collected": 0,
              "aborted": []}
    if not run_them:  # one process collects every file: what is checked here is the command, not the cases
        rc, tail = runner.cli("cuda-tests-collect", [*base, "--collect-only", *files], until - time.monotonic())
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", tail)
        totals["collected"] = int(collected.group(1)) if collected else 0
        step.figures = totals
        step.detail = f"collected only (no GPU): {totals['collected']} CUDA cases in {len(files)} files"
        if not totals["collected"]:
            step.status = "failed"
        return
    for index, path in enumerate(files):
        name = Path(path).stem
        # An equal share of what is left per file still to run: one slow file cannot starve the others.
        share = (until - time.monotonic()) / (len(files) - index)
        junit = results / f"{name}.xml"
        rc, tail = runner.cli(f"cuda-tests-{name}", [*base, "-v", f"--junitxml={junit}", path], share)
        counts = _junit_counts(junit)
        if counts is None and rc == 124:  # cut at its share: the verbose log still says how each case ended
            counts = _verbose_counts(runner.logs / f"cuda-tests-{name}.log")
        if counts is None and rc not in (5, 124):  # died without results (5: nothing collected)
            counts = _cases_one_by_one(runner, path, base, results, time.monotonic() + share, totals)
        for key, value in (counts or {}).items():
            totals[key] += value
        if rc == 124:
            totals["aborted"].append(f"{path} (budget)")
    step.figures = totals
    failed = totals["failures"] + totals["errors"]
    step.detail = (f"{totals['tests'] - failed - totals['skipped']} passed, {failed} failed, "
                   f"{totals['skipped']} skipped in {len(files)} files"
                   + (f"; cut short or aborted: {', '.join(totals['aborted'])}" if totals["aborted"] else ""))
    if failed or totals["aborted"]:
        step.status = "failed"


def _verbose_counts(log: Path) -> dict:
    """JUnit-like counts from a `pytest -v` log: one "PASSED", "FAILED", "SKIPPED" or "ERROR" line per case."""
    ends = re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log.read_text(errors="replace"))
    return {"tests": len(ends), "failures": ends.count("FAILED"), "errors": ends.count("ERROR"),
            "skipped": ends.count("SKIPPED")}


def _cases_one_by_one(runner, path, base, results, until, totals) -> dict:
    rc, _ = runner.cli(f"cuda-tests-{Path(path).stem}-ids", [*base, "--collect-only", "-q", path],
                       until - time.monotonic())
    ids = [line for line in (runner.logs / f"cuda-tests-{Path(path).stem}-ids.log").read_text().splitlines()
           if "::" in line]
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for index, node in enumerate(ids):
        if until - time.monotonic() < 5:
            totals["aborted"].append(f"{path}: {len(ids) - index} cases not run (budget)")
            break
        junit = results / f"{Path(path).stem}.{index}.xml"
        rc, _ = runner.cli(f"cuda-tests-{Path(path).stem}-{index}", [*base, f"--junitxml={junit}", node],
                           until - time.monotonic())
        found = _junit_counts(junit)
        if found is None:
            totals["aborted"].append(f"{node} (exit status {rc})")
            counts["tests"] += 1
            counts["errors"] += 1
        else:
            counts = {k: counts[k] + found[k] for k in counts}
    return counts


def _kernel_row_key(row: dict) -> str:
    return json.dumps([row.get("op"), row.get("shape"), row.get("impl")], sort_keys=True)


def run_kernel_bench(runner: Runner, step: Step, label: str, args: tuple[str, ...]) -> None:
    """kernels.bench with `args`, its JSON (rewritten by the bench after every row) in OUT; its rows, even those of
    a bench cut short, join the report's "kernels" (a later row replaces an earlier one with the same key)."""
    report = runner.out / f"kernels_{label}.json"
    rc, tail = runner.cli(f"kernels-bench-{label}", ["-m", "kernels.bench", "--json", str(report), *args], step.cap)
    data = json.loads(report.read_text()) if report.is_file() else {}
    rows = {_kernel_row_key(row): row for row in runner.report.get("kernels", [])}
    for row in data.get("results", []):
        rows[_kernel_row_key(row)] = row
    runner.report["kernels"] = list(rows.values())
    runner.report.setdefault("kernels_meta", {}).update({k: v for k, v in data.items() if k != "results"})
    mine = data.get("results", [])
    errors = [r for r in mine if r.get("error")]
    nan = [r for r in mine if r.get("nan")]
    step.figures = {"rows": len(mine), "errors": len(errors), "nan_rows": len(nan), "complete": data.get("complete")}
    step.detail = f"{len(mine)} rows, {len(errors)} with errors, {len(nan)} with NaN" \
        + ("" if data.get("complete") else " (cut short: the rows measured are kept)")
    _require(rc, "kernels.bench", tail)
    if errors or nan:
        step.status = "failed"


def run_cache_bench(runner: Runner, step: Step, paths: dict, sizes: Sizes) -> None:
    report = runner.out / "cache_bench.json"
    rc, tail = runner.cli("cache-bench", ["-m", "cache_teacher", "bench", "--teacher", "path-b", "--weights",
                                          str(paths["weights"]["path-b"]), "--images", str(paths["images"]),
                                          "--backgrounds", str(paths["backgrounds"]), "--json", str(report),
                                          *sizes.cache_args], step.cap)
    _require(rc, "cache_teacher bench", tail)
    step.figures = json.loads(report.read_text())
    f = step.figures
    step.detail = (f"pipeline {f['pipeline_view_sets_per_s']:.1f} vs teacher-only {f['teacher_only_view_sets_per_s']:.1f} "
                   f"view sets/s ({100 * f['pipeline_fraction']:.0f}%; serial {100 * f['serial_fraction']:.0f}%), "
                   f"batch {f['batch_size']}")


def run_train_bench(runner: Runner, step: Step, recipe: str, paths: dict, sizes: Sizes, compiled: bool) -> None:
    teacher = _teacher(recipe)
    report = runner.out / f"train_bench_{recipe}{'_compiled' if compiled else ''}.json"
    rc, tail = runner.cli(f"train-bench-{recipe}{'-compiled' if compiled else ''}", [
        "-m", "train_student", "bench", "--recipe", recipe, "--store", str(paths["store"][teacher]),
        "--images", str(paths["images"]), "--backgrounds", str(paths["backgrounds"]), "--teacher-weights",
        str(paths["weights"][teacher]), "--out", str(report), *sizes.train_args,
        *(("--compile", "both") if compiled else ())], step.cap)
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
        print(f"{'op':9} {'shape':40} {'impl':16} {'ms':>9} {'pred ms':>8} {'x pred':>6} {'peak MiB':>9} "
              f"{'max rel err':>11} {'NaN':>4}  error")
        for row in rows:  # in the order measured: the target recipe's first
            shape = " ".join(f"{k}={v}" for k, v in (row.get("shape") or {}).items() if k != "dtype")
            nan = row.get("nan")
            print(f"{row.get('op', '?'):9} {shape[:40]:40} {str(row.get('impl', '?'))[:16]:16} "
                  f"{_num(row.get('ms'), '9.3f'):>9} {_num(row.get('predicted_ms'), '8.3f'):>8} "
                  f"{_num(row.get('measured_over_predicted'), '6.2f'):>6} {_num(row.get('peak_mib'), '9.1f'):>9} "
                  f"{_num(row.get('max_rel_err'), '11.2e'):>11} {'-' if nan is None else 'yes' if nan else 'no':>4}  "
                  f"{row.get('error') or ''}")
        print("pred ms: kernels.cost_model for the fused rows, at this GPU's measured ceilings (L2 probe, copy, "
              "GEMM); x pred: measured / predicted")
    env = runner.report.get("environment", {})
    print(f"\ngpu-check ({runner.mode} mode): {env.get('gpu') or 'no GPU'}, Python {env.get('python', '?')}, "
          f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, timm {env.get('timm', '?')}, "
          f"numpy {env.get('numpy', '?')}; {runner.report.get('elapsed_s', 0):.0f} s of {runner.budget_s:.0f} s")
    print(f"| {'step':<28} | {'status':<7} | {'s':>6} | result")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 8}|{'-' * 60}")
    for s in runner.steps:
        print(f"| {s.name:<28} | {s.status:<7} | {s.seconds:6.1f} | {s.detail.splitlines()[0] if s.detail else ''}")
    train = [(s.name.removeprefix("train "), s.figures) for s in runner.steps
             if s.name.startswith("train ") and s.status == "ok"]
    if train:
        print(f"\n| {'recipe':<24} | {'batch':>5} | {'cached /s':>10} | {'staged /s':>10} | {'cached/staged':>13} | "
              f"{'online /s':>10} | {'speed-up':>8} | {'live /s':>9} | {'data wait':>9} | {'render':>7} | "
              f"{'compiled /s':>11} | {'compile':>7} |")
        for recipe, f in train:
            wait, render, ratio = f.get("data_wait_share"), f.get("render_share"), f.get("cached_vs_staged")
            print(f"| {recipe:<24} | {f.get('batch', 0):>5} | {_num(f.get('cached_step_samples_per_s'), '10.1f')} | "
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
          + (f"; not ok: {', '.join(failed)} (logs in {runner.out / 'logs.tar.gz'})" if failed else "")
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
    parser.add_argument("--wheelhouse", type=Path, help="folder from `make wheelhouse`, used for what the image lacks "
                        "or has too old (installed into the work folder, offline)")
    parser.add_argument("--out", type=lambda text: Path(output_folder(text)), default=Path("gpu_check_out"),
                        help="results folder, everything worth keeping and nothing else (default gpu_check_out)")
    parser.add_argument("--work", type=lambda text: Path(output_folder(text)),
                        help="inputs, checkpoints, stores and installed wheels "
                        "(default: OUT_work beside OUT)")
    parser.add_argument("--budget-s", type=real(0.0, low_open=True),
                        help="overall time budget in seconds (> 0; default: 470 full, 1800 tiny)")
    parser.add_argument("--only", metavar="STEP,...", help=f"run only these of {', '.join(STEP_KEYS)} (the environment "
                        "step always runs, and the inputs when train or cache needs them); default: all")
    args = parser.parse_args(argv)
    only = set(STEP_KEYS) if args.only is None else set(args.only.split(","))
    if not only <= set(STEP_KEYS):
        parser.error(f"--only: unknown step(s) {', '.join(sorted(only - set(STEP_KEYS)))}; "
                     f"known: {', '.join(STEP_KEYS)}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive; got {args.budget_s:g}")

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
    work = (args.work or out.with_name(out.name + "_work")).resolve()
    runner = Runner(out, work, sizes, args.budget_s or sizes.budget_s, mode)
    paths: dict = {}

    with runner.step("environment", "environment") as step:
        if step:
            check_environment(runner, step, args.wheelhouse.resolve() if args.wheelhouse else None)
    if "kernels" in only:
        with runner.step(f"kernels {TARGET_RECIPE}", "kernels", ("environment",), KERNEL_MODULES) as step:
            if step:
                run_kernel_bench(runner, step, TARGET_RECIPE, sizes.first_kernels)
    if only & {"train", "cache"}:
        with runner.step("inputs", "inputs", ("environment",), STAGE_MODULES) as step:
            if step:
                prepare_inputs(runner, step, sizes, _teacher(TARGET_RECIPE), paths)
    if "train" in only:
        with runner.step(f"train {TARGET_RECIPE}", "train", ("inputs",)) as step:
            if step:
                run_train_bench(runner, step, TARGET_RECIPE, paths, sizes, compiled=False)
    if "cuda-tests" in only:
        with runner.step("CUDA tests", "cuda-tests", ("environment",), TEST_MODULES) as step:
            if step:
                run_cuda_tests(runner, step, sizes.run_cuda_tests)
    # The rest, as the budget allows.
    if "kernels" in only:
        with runner.step("kernels all recipes", "more-kernels", ("environment",), KERNEL_MODULES) as step:
            if step:
                run_kernel_bench(runner, step, "all", sizes.more_kernels)
    if "cache" in only:
        with runner.step("cache pipeline", "cache", ("inputs",)) as step:
            if step:
                run_cache_bench(runner, step, paths, sizes)
    for recipe in sizes.more_recipes if "train" in only else ():
        inputs = f"inputs {_teacher(recipe)}"
        with runner.step(inputs, "inputs", ("inputs",)) as step:
            if step:
                prepare_inputs(runner, step, sizes, _teacher(recipe), paths)
        with runner.step(f"train {recipe}", "train", (inputs,)) as step:
            if step:
                run_train_bench(runner, step, recipe, paths, sizes, compiled=False)
    if sizes.compile_target and "train" in only:  # last: compiling costs minutes
        with runner.step(f"train {TARGET_RECIPE} compiled", "compiled", ("inputs",)) as step:
            if step:
                run_train_bench(runner, step, TARGET_RECIPE, paths, sizes, compiled=True)
    runner.save()
    print_tables(runner)
    return 0 if all(s.status == "ok" for s in runner.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
