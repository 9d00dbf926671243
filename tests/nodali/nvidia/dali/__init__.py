# Put on sys.path/PYTHONPATH by tests/conftest.py when FASTGAL_NO_DALI=1: this portion of the
# `nvidia` namespace package comes first, so `import nvidia.dali` fails as on a machine without DALI
# (macOS, Windows, many aarch64 and ROCm boxes), in the test process and in its subprocesses alike.
raise ImportError("NVIDIA DALI is blocked for this test pass (FASTGAL_NO_DALI=1)")
