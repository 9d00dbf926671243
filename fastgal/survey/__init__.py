"""Surveys: where cutouts and catalogs come from -> master.csv + images/ (the layout `fastgal shard` reads).

    fastgal synth data/synth --n 2000            # synth.py (the catalog, the command) + render.py (one galaxy's pixels)
    fastgal download data/sdss --limit 100       # download.py (the command) + skyserver.py (the SkyServer client)

floor.py holds the synthetic survey's accuracy references (the latent floor, the observable reference).
Builds on the shard formats (catalog ids, FITS I/O) and nothing above them.
"""
