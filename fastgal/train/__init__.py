"""Training pieces: the seed recipe's Learner and what it is made of (no command here: run.py is `fastgal train`).

    model.py        xresnet + self-attention + Mish, the target scaling, the loss and metrics
    heads.py        the output heads (plain RMSE, Gaussian mean + sigma)
    ranger.py       fastai's ranger over flat buffers
    loop.py         fastai's loop with the losses kept on the device
    learner.py      make_learner: the pieces above as one fastai Learner
    callbacks.py    epoch stats and progress, DDP, the best epoch, the epoch's seed
    checkpoints.py  model.pt (what predict reads) and checkpoint.pth (what --resume reads)
    device.py       --device and --precision resolved
"""
