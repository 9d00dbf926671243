"""fastgal: galaxy metallicity from SDSS gri cutouts, trained fast (WebDataset shards + NVIDIA DALI + fastai).

The command line (`fastgal --help`) runs the whole job. The Python API, for a notebook or your own Learner
(everything not listed here is private and may change between versions):

    import fastgal
    dls = fastgal.dataloaders("shards/synth", bs=64, size=56)     # fastai DataLoaders over fastgal shards
    dls.show_batch()                                              # one training batch, denormalised
    learn = fastgal.recipe_learner(dls, arch="xresnet18")         # the seed's recipe as a fastai Learner
    learn.lr_find(); learn.fit_one_cycle(3, 1e-2)
    df = fastgal.predict(learn, "shards/synth")                   # a DataFrame; also a run folder, a JPEG folder
    shards = fastgal.Shards("shards/synth")                       # the manifest, read once; .split("valid")

  dataloaders(shards, bs, size, crop, device, backend, ...)  fastai DataLoaders: train (an exact permutation
                  and augmentation draws per epoch), valid (file order); any fastai Learner trains on them
  recipe_learner(dls, arch, head, opt, precision, ...)      xresnet + SA + Mish, ranger, RMSE: the seed's Learner
  predict(model, data, split, tta, ...)                     predictions as a DataFrame (run folder or Learner)
  Shards(folder), Split                                     a shard folder's manifest and splits (keys, targets, bytes)
  RECIPE                                                    every number of the seed's recipe
"""

__version__ = "0.1.0"

__all__ = ["dataloaders", "recipe_learner", "predict", "Shards", "Split", "RECIPE", "__version__"]

# where each public name lives; imported on first use, so `import fastgal` (and the CLI) stays light
_HOME = {"dataloaders": "api", "recipe_learner": "api", "predict": "api", "Shards": "shards.read",
         "Split": "shards.read", "RECIPE": "recipe"}


def __getattr__(name):
    if name in _HOME:
        from importlib import import_module

        value = getattr(import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastgal' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
