"""The CUDA backend, by job: driver (context, buffers, graphs), build (nvcc), kernels (launchers), weights, kv, backend."""
