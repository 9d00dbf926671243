"""`fastgal bench`: observes the other layers (loaders, the model, a training step, the shuffle); nothing but
the CLI imports it.

    fastgal bench shards/synth --what loaders,model,e2e
"""
