"""Loading: a Split -> the batches a model reads, in a plan's order, through one backend (DALI or torch).

    dls = fastgal.dataloaders("shards/synth", bs=128)       # loader.py: the one Loader, its backends
    order.py       each epoch's permutation and augmentation draws, from (seed, epoch) alone
    geometry.py    the crop rule, the views (training draws, centre, 8 dihedral TTA views), the torch transform
    preprocess.py  the crop region, the FITS stretch and the normalisation statistics, decided once per run
    decode.py      JPEG bytes -> uint8 tensors, a batch per call (nvJPEG on a GPU)
    dali.py        the DALI graph (the only module that builds one)
    show.py        a grid of images as a PNG (show_batch)
"""
