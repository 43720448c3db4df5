"""Single-kernel micro-benchmarks: one of server/kernels/ (or cuBLAS) on Mistral-7B's or
Mixtral-8x7B's shapes, timed from CUDA graphs (benchmarks/timing.py) against the copy rate
(benchmarks/roofline.py). Each is a script: `python benchmarks/kernel_bench/<name>.py --help`. (Not `benchmarks/kernels/`:
a script run from benchmarks/ has that folder first on its path, where a `kernels` package would
shadow Hugging Face's, which transformers imports.)"""
