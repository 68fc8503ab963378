"""One self-contained HTML report of a run folder (a single run, a demo, or a study of several runs).

Writes ``RUN_DIR/report/report.html`` with every figure embedded as a base64 ``data:`` URI (the file
works when copied elsewhere), and each figure also as a PNG next to it:

- run overview, held-out test metrics, run parameters and wall times (and the demo's summary table);
- the run outcome: why a run failed, sites that never contributed or missed rounds, an early stop;
- per FL run: the sites' per-round validation of the global model (key metric and loss);
- ROC curves of every classification run with ``test_predictions.csv``, overlaid per class set;
- a confusion matrix per classification run;
- reliability diagrams (calibration) of the two-class runs, with their expected calibration error;
- per FL run: the cross-site evaluation heat map (models x sites' validation splits + test);
- ``interpretability.json`` as a table and every ``figures/*.png`` of the run folder.

A section without data is left out; a malformed file becomes a note at the top of the report.

Modules: ``reading`` (the only one that opens run files), ``metrics`` (ROC/AUC via torchmetrics,
calibration, confusion), ``figures`` (matplotlib), ``html`` (markup), ``sections`` (data -> HTML),
``build`` (``write_report``).
"""

from cxrfl.report.build import ReportError, write_report
from cxrfl.report.metrics import auc, reliability, roc_curve, roc_of
from cxrfl.report.reading import Predictions

__all__ = ["Predictions", "ReportError", "auc", "reliability", "roc_curve", "roc_of", "write_report"]
