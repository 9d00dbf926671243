# Put on sys.path by tests/conftest.py when FASTGAL_NO_DALI=1: DALI's wds2idx tool ships with its wheel,
# so a machine without DALI has no wds2idx either (fastgal then writes the same index itself).
raise ImportError("wds2idx (part of NVIDIA DALI) is blocked for this test pass (FASTGAL_NO_DALI=1)")
