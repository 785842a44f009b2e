# `kernels` is imported before any test module: on machines without CUDA it selects Triton's
# interpreter, which must happen before anything (timm, for one) imports triton.
import kernels  # noqa: F401
