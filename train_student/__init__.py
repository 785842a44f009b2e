"""Stage 2: distil a student from cached teacher targets. Command line: `python -m train_student --help`.

Python API (the same options as the command line and --config, checked the same way):

    import train_student
    spec = train_student.training_spec("train.yaml", epochs=2)   # or a run.json, a dict, or keywords alone
    run_dir = train_student.fit(spec)                             # the run folder, as the command writes it

Call these before anything imports timm or triton (as the command lines do), so that the fused kernels can be
set to run compiled on a GPU or interpreted on a CPU (`kernels.select_interpreter`).
"""


def training_spec(config=None, **options):
    """A checked `TrainSpec` from a config file or mapping, with keyword options overriding it."""
    from kernels import select_interpreter
    select_interpreter()
    from train_student.__main__ import training_spec as build
    return build(config, **options)


def fit(spec):
    """Train as `python -m train_student` does (errors are raised, not printed); returns the run folder."""
    from kernels import select_interpreter
    select_interpreter()
    from train_student.train import train
    return train(spec)


__all__ = ["fit", "training_spec"]
