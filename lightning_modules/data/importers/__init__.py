"""Importers: each public data set's native layout -> one pooled manifest (`cxrfl data import`).

One module per format, each declaring its layout (module docstring; ``LAYOUT`` is the one-line
form for help and errors); `common` holds what they share. Every importer reads a source folder
(for "csv": a CSV file) in place and writes OUT/manifest.csv (absolute paths), OUT/dataset.json
and, where masks must be combined or rasterised, OUT/masks/*.png.

Errors. A problem with the source as a whole (a missing folder or CSV, missing CSV columns,
unparsable annotation JSON, labels that contradict each other, nothing usable at all) raises
``ManifestError`` naming the file and the problem. A single unusable item (a missing, empty or
unrecognisable image, a missing mask) is skipped and reported through the ``cxrfl.data`` logger
with one line naming the file and why, so one bad file never aborts an import.

Each importer returns an ``ImportResult``: a ``list`` of ``Record`` that also carries ``skipped``
(the (path, reason) pairs of the skipped items).

To add a format: a module here with FORMAT, LAYOUT and ``import_<name>(src, out, **options)``
ending in ``ImportRun.finish``, then one line in IMPORTERS and LAYOUTS below.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

from lightning_modules.data.importers import generic_csv, kermany, montgomery, rsna, shenzhen, v7
from lightning_modules.data.importers.common import ImportResult
from lightning_modules.data.manifest import ManifestError

# Format name (as `cxrfl data import FORMAT` takes it) -> importer, in the order help lists them.
IMPORTERS: dict[str, Callable[..., ImportResult]] = {
    kermany.FORMAT: kermany.import_kermany,
    rsna.FORMAT: rsna.import_rsna,
    montgomery.FORMAT: montgomery.import_montgomery,
    shenzhen.FORMAT: shenzhen.import_shenzhen,
    v7.FORMAT: v7.import_v7,
    generic_csv.FORMAT: generic_csv.import_generic_csv,
}

# Native layout of each format, for `cxrfl data import --help`.
LAYOUTS: dict[str, str] = {
    module.FORMAT: module.LAYOUT for module in (kermany, rsna, montgomery, shenzhen, v7, generic_csv)
}


def import_dataset(fmt: str, src: str | os.PathLike, out: str | os.PathLike, **options) -> ImportResult:
    """Run the importer for ``fmt``; options that are None are dropped, unknown ones raise ManifestError."""
    if fmt not in IMPORTERS:
        raise ManifestError(f"unknown data set format {fmt!r} (known: {', '.join(IMPORTERS)})")
    importer = IMPORTERS[fmt]
    options = {k: v for k, v in options.items() if v is not None}
    accepted = [p for p in inspect.signature(importer).parameters if p not in ("src", "out")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ManifestError(
            f"option(s) {', '.join(unknown)} do not apply to format {fmt!r}"
            + (f" (it accepts: {', '.join(accepted)})" if accepted else " (it takes no options)")
        )
    return importer(src, out, **options)


__all__ = ["IMPORTERS", "LAYOUTS", "ImportResult", "import_dataset"]
