"""Site split: one manifest -> federated sites plus a held-out test set (`cxrfl data split`).

`partition` decides which record goes to which site and split (pure: no files), `summary`
describes a split as a table, `write` writes it as a data root with that table next to it.
"""

from lightning_modules.data.split.partition import MODES, SplitResult, patient_key, split_into_sites
from lightning_modules.data.split.summary import describe, format_summary, summarize
from lightning_modules.data.split.write import SUMMARY_CSV, SUMMARY_MD, write_data_root

__all__ = [
    "MODES", "SUMMARY_CSV", "SUMMARY_MD", "SplitResult", "describe", "format_summary", "patient_key",
    "split_into_sites", "summarize", "write_data_root",
]
