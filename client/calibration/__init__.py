"""Calibration: measure how deep a hit may skip, per similarity bin, and fit a namespace's step tables.

    from flexcache.client.calibration import measure, fit
    m = measure(sampler, scorer, prompts)          # paired trials (measure.py)
    tables = fit(m.trials, sampler.total_steps, max_loss=1.0)   # per-bin K within budget (fit.py)

The `flexcache-calibrate` CLI (cli.py) runs both, reports (report.py) and installs the tables on a
daemon. numpy only: the sampler brings the model (sampler.py).
"""

from .fit import Fit, fit
from .measure import TABLES, Measurement, Trial, measure
from .sampler import Sampler, Scorer

__all__ = ["TABLES", "Fit", "Measurement", "Sampler", "Scorer", "Trial", "fit", "measure"]
