"""A privacy audit folder in `cxrfl report` (`cxrfl audit`): the privacy-utility table and the reconstructions."""

from __future__ import annotations

from pathlib import Path

from cxrfl.audit.table import AUDIT_JSON, GRID_PNG, table_rows
from cxrfl.report import html
from cxrfl.report.reading import Notes, read_json, read_png


def read_audit(run_dir: Path, notes: Notes) -> dict | None:
    """An audit's audit.json; None when the folder holds none (with a note when it is malformed)."""
    path = run_dir / AUDIT_JSON
    if not path.is_file():
        return None
    data = read_json(path, notes, dict)
    if data is None:
        return None
    if not isinstance(data.get("inversion"), list) or not isinstance(data.get("utility"), list):
        notes.add(path, "needs \"inversion\" and \"utility\" (lists); skipped")
        return None
    return data


def audit_section(audit: dict, run_dir: Path, notes: Notes, figures: dict[str, bytes]) -> str:
    """The table, then the grid of true images and their reconstructions (also kept in report/)."""
    try:
        head, rows = table_rows(audit)
    except (KeyError, TypeError) as exc:
        notes.add(run_dir / AUDIT_JSON, f"rows not as cxrfl writes them ({exc!r}); table skipped")
        head, rows = [], []
    settings = audit.get("settings", {}) if isinstance(audit.get("settings"), dict) else {}
    parts = ["<p>Gradient inversion of one site's update of one round (the server's view without HE), scored by "
             "SSIM against the true images (1: identical; unrelated images score near 0); membership inference "
             "on the final global model (0.5: no better than chance). See docs/privacy.md.</p>",
             html.facts({"attacked site": settings.get("attacked_site"), "attack iterations": settings.get("iterations"),
                         "image size": settings.get("image_size"), "rounds of the federated runs": settings.get("rounds"),
                         "delta": settings.get("delta")})]
    if rows:
        parts.append(html.table(head, rows))
    png = read_png(run_dir / GRID_PNG, notes)
    if png is not None:
        figures[GRID_PNG] = png
        parts.append(html.figure(html.img(png, alt="reconstructions"),
                                 "top of each pair: the site's true images; below: what the attack rebuilt, with SSIM"))
    return html.section("privacy-audit", "Privacy audit", "".join(parts))
