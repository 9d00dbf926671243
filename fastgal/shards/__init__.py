"""The shard format: catalog + cutouts -> WebDataset tars + DALI .idx + manifest.json + rejects.csv, and back.

    fastgal shard CATALOG IMAGES OUT     # write.py (the command), catalog.py (rows, exact ids, the split),
                                         # cutouts.py (one cutout checked), fits.py (FITS bands),
                                         # folder.py (what an images folder holds, checked up front)
    fastgal info OUT                     # verify.py: every byte re-checked against the manifest
    Shards(OUT).split("valid")           # read.py: the manifest and a split's samples, read once; index.py: .idx files

Everything that reads or writes these files lives here; nothing here knows about loading or training.
"""
