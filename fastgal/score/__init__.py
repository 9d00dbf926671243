"""Scoring a trained model: predictions over a Split or a folder, and what a person reads of them.

    predict.py      the one predict (shards or a folder of cutouts) -> a table
    diagnostics.py  the scores train and predict report (target_scores): RMSE, bias and scatter in bins, the MZR,
                    calibration of sigma
    plots.py        the PNG figures
    summary.py      the summaries the commands print
"""
