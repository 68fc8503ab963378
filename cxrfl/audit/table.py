"""The privacy-utility table of an audit (audit.json -> rows), for audit.md and the report; no heavy imports."""

from __future__ import annotations

AUDIT_JSON, AUDIT_MD, GRID_PNG = "audit.json", "audit.md", "reconstructions.png"


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:.3g}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _inversion_cell(row: dict) -> str:
    """Mean SSIM of the reconstructions, and how many of the batch's patients they picked out of the line-up."""
    identified, size = row.get("identified"), row.get("batch_size")
    if not isinstance(identified, (int, float)) or not isinstance(size, int):
        return _cell(row.get("ssim"))
    return f"{_cell(row.get('ssim'))} ({round(identified * size)}/{size})"


def table_rows(audit: dict) -> tuple[list[str], list[list[str]]]:
    """(head, rows): first the baseline (other patients' images scored as if they were reconstructions), then per
    defence, epsilon, the mean reconstruction SSIM per model and batch size with the share of patients
    identified in a line-up of the hospital's other patients, membership-inference AUC and test AUROC; HE as a
    row without attacks."""
    inversion = [r for r in audit.get("inversion", []) if isinstance(r, dict)]
    utility = {u["defence"]: u for u in audit.get("utility", []) if isinstance(u, dict) and "defence" in u}
    models = list(dict.fromkeys(r["model"] for r in inversion))
    sizes = list(dict.fromkeys(r["batch_size"] for r in inversion))
    names = list(dict.fromkeys([r["defence"] for r in inversion] + list(utility)))
    head = ["defence", "epsilon"] + [f"SSIM (identified) {m} batch {b}" for m in models for b in sizes] + \
        ["membership-inference AUC", "test AUROC"]
    baseline = {(r["model"], r["batch_size"]): r.get("other_patients_ssim") for r in inversion}
    rows = [["other patients' images (what a failed attack scores)", "–"]
            + [_cell(baseline.get((m, b))) if (m, b) in baseline else "–" for m in models for b in sizes]
            + ["0.5 (chance)", "–"]] if inversion else []
    for name in names:
        found = {(r["model"], r["batch_size"]): r for r in inversion if r["defence"] == name}
        first = next(iter(found.values()), None)
        eps = first.get("epsilon") if first else utility.get(name, {}).get("epsilon")
        row = [name, _cell(eps, 2) if eps is not None else "none"]
        row += [_inversion_cell(found[(m, b)]) if (m, b) in found else "–" for m in models for b in sizes]
        u = utility.get(name, {})
        rows.append(row + [_cell(u.get("membership_auc")), _cell(u.get("test_auroc"))])
    n = len(models) * len(sizes)
    if n:
        rows.append(["HE (the server's view)", "none", "no attack: the server holds ciphertexts only"]
                    + ["–"] * (n - 1) + ["–", "as FedAvg"])
    return head, rows


def privacy_table(audit: dict) -> str:
    """The table as markdown (audit.md, docs/privacy.md)."""
    head, rows = table_rows(audit)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
