"""Triton kernels of the ``triton`` backend; `gpurag_triton.launch` holds the host wrappers that check their inputs."""
