# The test session's explicit choice of how Triton runs the kernels, made before any test module imports
# triton (timm does): a TRITON_INTERPRET already set is kept, otherwise the interpreter runs them on CPU
# tensors exactly when no CUDA device is visible. Child processes inherit the choice through the environment.
from kernels import select_interpreter

select_interpreter()
