"""Stage 1: pack images, run a teacher once, write the target store. Command line: `python -m cache_teacher --help`.

Python API (the `run` command's options, checked the same way):

    import cache_teacher
    spec = cache_teacher.caching_spec("cache.yaml", views_per_image=2)   # or a dict, or keywords alone
    summary = cache_teacher.cache(spec)                                  # creates or resumes the store

Call these before anything imports timm or triton (as the command lines do), so that the fused kernels can be
set to run compiled on a GPU or interpreted on a CPU (`kernels.select_interpreter`).
"""


def caching_spec(config=None, **options):
    """A checked `cache_teacher.run.RunConfig` from a config file or mapping, with keyword options overriding it."""
    from kernels import select_interpreter
    select_interpreter()
    from cache_teacher.__main__ import caching_spec as build
    return build(config, **options)


def cache(spec):
    """Create or resume the store of `spec`, as `python -m cache_teacher run` does; returns its summary."""
    from kernels import select_interpreter
    select_interpreter()
    from cache_teacher.run import run
    return run(spec)


__all__ = ["cache", "caching_spec"]
