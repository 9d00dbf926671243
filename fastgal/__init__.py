"""fastgal: galaxy metallicity from SDSS gri cutouts, trained fast (WebDataset shards + NVIDIA DALI + fastai)."""

__version__ = "0.1.0"
