"""The self-contained HTML report of ``medfusion evaluate``: every image embedded as a data URI,
plots as inline SVG, no scripts, no files beside it; it opens in any browser."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
from PIL import Image

from medfusion.metrics.evaluate import interval_text, significant
from medfusion.metrics.intensity import number
from medfusion.utils import atomic_write_text
from medfusion.visualize import make_grid, mid_slices, to_uint8

GRID_IMAGES = 16  # per class and set
PAIRS_SHOWN = 8
COLUMNS = (
    ("fid", "FID ↓"),
    ("kid", "KID ↓"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("density", "density"),
    ("coverage", "coverage ↑"),
)
BAND_MARK = {True: ("in", "✓ within band"), False: ("out", "✗ outside band"), None: ("", "")}


def png_data_uri(images: torch.Tensor, nrow: int = 8) -> str:
    """A grid of ``images`` (N, C, *spatial) in [-1, 1] (volumes: middle slices) as a PNG data URI."""
    array = to_uint8(make_grid(mid_slices(images.float()), nrow=nrow))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(key: str, values: dict) -> str:
    """One metric of one row: the value on all images with its interval, and under it the synthetic
    value at the reference's n beside the real-vs-real value."""
    if key not in values:
        return "<td>–</td>"
    main = f"<b>{significant(values[key])}</b>"
    if key == "kid" and values["kid_std"] > 1e-12:  # 0 but rounding where the subsets are the whole sets
        main += f" ± {significant(values['kid_std'])}"
    main += html.escape(interval_text(values.get("interval", {}).get(key)))
    reference = values.get("reference", {})
    entry = reference.get(key)
    if entry is None:
        return f"<td>{main}</td>"
    if entry.get("ratio") is not None:
        change = f"{significant(entry['ratio'])}x"
    elif "difference" in entry:
        change = f"{'+' if entry['difference'] >= 0 else '−'}{significant(abs(entry['difference']))}"
    else:
        change = "–"
    css, mark = BAND_MARK[entry["within_band"]]
    detail = (
        f"n {reference['n_real']}/{reference['n_fake']}: {significant(entry['value'])}"
        f"{interval_text(entry.get('interval'))} · real vs real {significant(entry['reference'])}"
        f"{interval_text(entry.get('reference_interval'))} · {change}"
    )
    band = f" <span class='{css}'>{mark}</span>" if mark else ""
    return f"<td>{main}<div class='ref'>{html.escape(detail)}{band}</div></td>"


def _table(results: dict) -> str:
    rows = [("all", results["overall"]), *results["per_class"].items()]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    body = []
    for name, values in rows:
        cells = "".join(_cell(key, values) for key, _ in COLUMNS)
        counts = f"<td>{values['n_real']}</td><td>{values['n_fake']}</td>"
        body.append(f"<tr><th>{html.escape(str(name))}</th>{counts}{cells}</tr>")
    return f"<table><tr><th>class</th><th>real</th><th>synthetic</th>{head}</tr>{''.join(body)}</table>"


def _verdict(results: dict) -> str:
    """The headline against the real-vs-real band, the small-n warnings, and how both are defined."""
    verdict = results.get("verdict")
    parts = []
    if verdict is not None:
        css = BAND_MARK[verdict["within_band"]][0]
        parts.append(f"<p class='verdict {css}'><b>{html.escape(verdict['text'])}.</b></p>")
    for warning in results.get("warnings", []):
        parts.append(f"<p class='warning'>⚠ {html.escape(warning)}</p>")
    reference, bootstrap = results.get("reference"), results.get("bootstrap")
    if reference is not None and bootstrap is not None:
        level = f"{100 * bootstrap['level']:g}%"
        parts.append(
            "<p class='note'>Each cell: the value on all images (counts in the first columns) with its "
            f"{level} interval ({html.escape(bootstrap['interval'])} of {bootstrap['resamples']} "
            f"half-samples at most, fewer for large sets; {html.escape(bootstrap['method'])}). Under it, "
            "at n real/synthetic images: the synthetic value beside real vs real at the same n, and their "
            f"ratio (FID, KID) or difference. Real vs real: {html.escape(reference['definition'])}. "
            f"Band: {html.escape(reference['band'])}.</p>"
        )
    return "".join(parts)


def _pr_plot(results: dict, size: int = 260) -> str:
    """Precision (y) against recall (x) per class, as SVG."""
    margin, inner = 36, size - 52
    points = [("all", results["overall"]), *results["per_class"].items()]
    marks = []
    for i, (name, values) in enumerate(points):
        if "precision" not in values:
            continue
        x = margin + values["recall"] * inner
        y = size - margin - values["precision"] * inner
        colour = "#c0392b" if name == "all" else f"hsl({(i * 67) % 360},60%,40%)"
        marks.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>'
            f'<text x="{x + 7:.1f}" y="{y + 4:.1f}" font-size="11">{html.escape(str(name))}</text>'
        )
    axes = (
        f'<rect x="{margin}" y="{size - margin - inner}" width="{inner}" height="{inner}" '
        'fill="none" stroke="#999"/>'
        f'<text x="{margin + inner / 2}" y="{size - 8}" font-size="12" text-anchor="middle">recall</text>'
        f'<text x="12" y="{size / 2}" font-size="12" transform="rotate(-90 12 {size / 2})" '
        'text-anchor="middle">precision</text>'
        f'<text x="{margin}" y="{size - margin + 14}" font-size="10">0</text>'
        f'<text x="{margin + inner - 6}" y="{size - margin + 14}" font-size="10">1</text>'
        f'<text x="{margin - 12}" y="{size - margin - inner + 8}" font-size="10">1</text>'
    )
    return (
        f'<svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">{axes}{"".join(marks)}</svg>'
    )


def _histogram(fake: torch.Tensor, heldout: torch.Tensor, threshold: float, width: int = 520) -> str:
    """Histograms of nearest-training-image distances, synthetic and held-out, with the threshold."""
    height, margin, bins = 200, 30, 30
    low = float(min(fake.min(), heldout.min()))
    high = float(max(fake.max(), heldout.max()))
    high = high if high > low else low + 1.0
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    fake_counts = torch.histc(fake.double(), bins, low, high) / max(1, len(fake))
    held_counts = torch.histc(heldout.double(), bins, low, high) / max(1, len(heldout))
    top = float(max(fake_counts.max(), held_counts.max())) or 1.0
    bar = (width - 2 * margin) / bins
    shapes = []
    for counts, colour in ((held_counts, "rgba(41,128,185,0.5)"), (fake_counts, "rgba(192,57,43,0.5)")):
        for i, value in enumerate(counts.tolist()):
            h = (height - 2 * margin) * value / top
            shapes.append(
                f'<rect x="{margin + i * bar:.1f}" y="{height - margin - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{colour}"/>'
            )
    x = margin + (threshold - low) / (high - low) * (width - 2 * margin)
    shapes.append(
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{margin / 2}" y2="{height - margin}" stroke="black"/>'
    )
    labels = (
        f'<text x="{margin}" y="{height - 8}" font-size="10">{edges[0]:.3g}</text>'
        f'<text x="{width - margin}" y="{height - 8}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text>'
        f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">distance to the nearest '
        "training image</text>"
        f'<text x="{x + 4:.1f}" y="{margin / 2 + 10}" font-size="10">threshold</text>'
    )
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(shapes)}{labels}</svg>'


REAL_FILL, FAKE_FILL = "rgba(41,128,185,0.5)", "rgba(192,57,43,0.5)"


def _intensity_plot(entry: dict, channel: int, width: int = 520) -> str:
    """The real and synthetic histograms of one channel on their common bins, overlaid, as SVG."""
    height, margin = 200, 30
    histogram = entry["histogram"]
    edges = histogram["edges"][channel]
    sides = []
    for key, fill in (("real", REAL_FILL), ("fake", FAKE_FILL)):
        counts = histogram[key][channel]
        total = max(1, sum(counts))
        sides.append(([c / total for c in counts], fill))
    top = max(max(fractions) for fractions, _ in sides) or 1.0
    bar = (width - 2 * margin) / len(edges[:-1])
    shapes = []
    for fractions, fill in sides:
        for i, value in enumerate(fractions):
            if value <= 0:
                continue
            h = (height - 2 * margin) * value / top
            shapes.append(
                f'<rect x="{margin + i * bar:.1f}" y="{height - margin - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{fill}"/>'
            )
    axis = "value in the files' units" + (f", channel {channel}" if entry["channels"] > 1 else "")
    legend = "".join(
        f'<rect x="{width - margin - 90}" y="{8 + 16 * i}" width="12" height="12" fill="{fill}"/>'
        f'<text x="{width - margin - 72}" y="{18 + 16 * i}" font-size="11">{name}</text>'
        for i, (name, fill) in enumerate((("real", REAL_FILL), ("synthetic", FAKE_FILL)))
    )
    labels = (
        f'<line x1="{margin}" x2="{width - margin}" y1="{height - margin}" y2="{height - margin}" '
        'stroke="#999"/>'
        f'<text x="{margin}" y="{height - 8}" font-size="10">{html.escape(number(edges[0]))}</text>'
        f'<text x="{width - margin}" y="{height - 8}" font-size="10" text-anchor="end">'
        f"{html.escape(number(edges[-1]))}</text>"
        f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">'
        f"{html.escape(axis)}</text>"
    )
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"{''.join(shapes)}{labels}{legend}</svg>"
    )


def _intensity_numbers(entry: dict) -> str:
    """Per channel: W1 in the files' units and relative, the real-vs-real reference, and each side's
    summary (dtype, min, 1st/50th/99th percentile, max)."""
    reference = entry["reference"]
    rows = []
    for c in range(entry["channels"]):
        relative = entry["relative_w1"][c]
        base = reference["relative_w1"][c] if reference is not None else None
        cells = [
            number(entry["w1"][c]),
            f"{number(relative)}x" if relative is not None else "–",
            f"{number(reference['w1'][c])} ({number(base)}x)" if base is not None else "–",
        ]
        for side in (entry["real"], entry["fake"]):
            stats = " / ".join(number(side[key][c]) for key in ("min", "p1", "p50", "p99", "max"))
            cells.append(f"{side['dtype']}: {stats}")
        channel = f"<th>{c}</th>" if entry["channels"] > 1 else ""
        rows.append(f"<tr>{channel}{''.join(f'<td>{html.escape(cell)}</td>' for cell in cells)}</tr>")
    channel = "<th>channel</th>" if entry["channels"] > 1 else ""
    head = (
        f"<tr>{channel}<th>W1 (units)</th><th>W1 / real range</th><th>real vs real</th>"
        "<th>real: dtype: min / 1% / median / 99% / max</th><th>synthetic: the same</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _intensities(intensity: dict) -> str:
    """Real and synthetic values in the files' own units, per class: histograms, W1, the warning."""
    definitions = intensity["definitions"]
    flagged = definitions["flagged"][:1].upper() + definitions["flagged"][1:]
    parts = [
        "<h2>Intensities in the files' units</h2><p class='note'>The values as stored in the files, "
        "before any normalisation (the feature metrics above normalise each image on its own and "
        "cannot see whether the synthetic files are in the real data's units). Values: "
        f"{html.escape(definitions['values'])}. W1: {html.escape(definitions['w1'])}; W1 / real range: "
        f"{html.escape(definitions['relative_w1'])}; {html.escape(definitions['reference'])}. "
        f"{html.escape(flagged)}. Histograms: fractions of each side's values on common bins (values "
        "beyond the bins in the end bins); blue real, red synthetic.</p>"
    ]
    for name, entry in [("all", intensity["overall"]), *intensity["per_class"].items()]:
        files = (
            f"{entry['real']['files_read']} of {entry['real']['n_files']} real and "
            f"{entry['fake']['files_read']} of {entry['fake']['n_files']} synthetic files"
        )
        parts.append(f"<h3>{html.escape(str(name))}</h3><p class='note'>{files}</p>")
        parts.append(_intensity_numbers(entry))
        if entry["warning"]:
            parts.append(f"<p class='warning'>⚠ {html.escape(entry['warning'])}</p>")
        parts += [_intensity_plot(entry, c) for c in range(entry["channels"])]
    return "".join(parts)


def _grids(real_set, fake_set) -> str:
    sections = []
    for label in sorted(set(real_set.kept) | set(fake_set.kept), key=str):
        name = html.escape(str(label) if label is not None else "all (unlabelled)")
        cells = []
        for title, image_set in (("real", real_set), ("synthetic", fake_set)):
            images = image_set.kept.get(label)
            if images is None:
                cells.append(f"<div><h4>{title}</h4><p>none</p></div>")
                continue
            uri = png_data_uri(images[:GRID_IMAGES], nrow=8)
            cells.append(f'<div><h4>{title}</h4><img alt="{title} {name}" src="{uri}"></div>')
        sections.append(f'<h3>{name}</h3><div class="pair">{"".join(cells)}</div>')
    return "".join(sections)


def _closest_pairs(fake_set, train_set, audit) -> str:
    rows = []
    for fake_index, train_index, distance in audit.closest[:PAIRS_SHOWN]:
        pair = torch.stack([fake_set.dataset[fake_index]["image"], train_set.dataset[train_index]["image"]])
        flagged = " (flagged)" if distance < audit.threshold else ""
        rows.append(
            f'<figure><img alt="closest pair {fake_index}" src="{png_data_uri(pair, nrow=2)}">'
            f"<figcaption>synthetic #{fake_index} · training #{train_index} · distance {distance:.4g}"
            f"{flagged}</figcaption></figure>"
        )
    return "".join(rows)


def _pipeline(pipeline: dict) -> str:
    """The stages that made the synthetic images (``medfusion demo``), with their times and details."""
    rows = []
    for name, info in pipeline.get("stages", {}).items():
        details = ", ".join(
            f"{html.escape(str(k))} {v:.4g}"
            if isinstance(v, float)
            else f"{html.escape(str(k))} {html.escape(str(v))}"
            for k, v in info.items()
            if k != "seconds"
        )
        seconds = f"{info.get('seconds', 0):.1f}"
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{seconds}</td><td class='left'>{details}</td></tr>")
    about = ", ".join(
        f"{html.escape(str(k))} {html.escape(str(v))}" for k, v in pipeline.items() if k != "stages"
    )
    return (
        f"<h2>How the synthetic images were made</h2><p>{about}</p>"
        f"<table><tr><th>stage</th><th>seconds</th><th class='left'>details</th></tr>{''.join(rows)}</table>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child{text-align:left}.pair{display:flex;gap:2em}img{image-rendering:pixelated;max-width:520px}
figure{display:inline-block;margin:0.5em}figcaption{font-size:12px}.note{color:#555}td.left,th.left{text-align:left}
td{vertical-align:top}.ref{font-size:11px;color:#555;white-space:nowrap}.in{color:#1e7b34}.out{color:#b03a2e}
.verdict{font-size:1.1em}.warning{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px}
"""


_UTILITY_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("auroc", "macro AUROC"),
)


def _utility(tstr: dict) -> str:
    """Train on synthetic, test on real (TSTR) beside train on real, test on real (TRTR)."""

    def cell(entry: dict) -> str:
        return f"{significant(entry['mean'])} ± {significant(entry['std'])}"

    seeds = ", ".join(str(s) for s in tstr["seeds"])
    rows = [
        f"<tr><th>{label}</th><td>{cell(tstr['tstr'][key])}</td><td>{cell(tstr['trtr'][key])}</td></tr>"
        for key, label in _UTILITY_METRICS
    ]
    recall_tstr, recall_trtr = (
        tstr["tstr"]["recall_per_class"]["mean"],
        tstr["trtr"]["recall_per_class"]["mean"],
    )
    rows += [
        f"<tr><th>recall: {html.escape(str(name))}</th><td>{significant(recall_tstr[name])}</td>"
        f"<td>{significant(recall_trtr[name])}</td></tr>"
        for name in tstr["classes"]
    ]
    n_train = tstr["n_train"]
    return (
        "<h2>Utility: train on synthetic, test on real</h2><p class='note'>The same classifier trained on "
        f"the synthetic images (TSTR, {n_train['tstr']} images) and on the real training images (TRTR, "
        f"{n_train['trtr']} images), each tested on the {tstr['n_test']} held-out real images; mean ± std "
        f"over seeds {seeds}. TSTR close to TRTR means the synthetic data can stand in for the real "
        "data in training.</p><table><tr><th></th><th>TSTR</th><th>TRTR</th></tr>"
        + "".join(rows)
        + "</table>"
    )


_CALIBRATION_COLUMNS = (("fid_ratio", "FD / real vs real"), ("fid", "FD"), ("precision", "precision"),
                        ("recall", "recall"), ("density", "density"), ("coverage", "coverage"))  # fmt: skip


def _calibration(calibration: dict) -> str:
    """What this yardstick can see: the degradations of real images scored like synthetic ones."""
    if "skipped" in calibration:
        return f"<h2>What this yardstick can see</h2><p>{html.escape(calibration['skipped'])}</p>"
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in _CALIBRATION_COLUMNS)
    rows = []
    reference = calibration["reference"]
    cells = "".join(
        f"<td>{'1x' if key == 'fid_ratio' else significant(reference.get(key))}</td>"
        for key, _ in _CALIBRATION_COLUMNS
    )
    rows.append(f"<tr><th>none (real vs real)</th>{cells}</tr>")
    for name, entry in calibration["degradations"].items():
        if "flagged" in entry:
            text = f"{100 * entry['flagged']:.1f}% flagged by the memorisation audit"
            cells = f"<td colspan='{len(_CALIBRATION_COLUMNS)}'>{text}</td>"
        else:
            times = {"fid_ratio": "x"}
            cells = "".join(
                f"<td>{significant(entry.get(key))}{times.get(key, '') if entry.get(key) else ''}</td>"
                for key, _ in _CALIBRATION_COLUMNS
            )
        rows.append(f"<tr><th>{html.escape(name)}<div class='ref'>{html.escape(entry['description'])}</div>"
                    f"</th>{cells}</tr>")  # fmt: skip
    checks = "".join(
        f"<li><span class='{'in' if c['passed'] else 'out'}'>{'✓' if c['passed'] else '✗'}</span> "
        f"{html.escape(c['check'])}: {significant(c['value'])}</li>"
        for c in calibration["checks"]
    )
    return (
        "<h2>What this yardstick can see</h2><p class='note'>Known degradations of "
        f"{html.escape(calibration['degraded'])} ({calibration['n']} images), each scored against the same "
        "real images with the same features as the synthetic set. A yardstick that cannot tell these from "
        "real images cannot vouch for synthetic ones.</p>"
        f"<table><tr><th>degradation</th>{head}</tr>{''.join(rows)}</table><ul>{checks}</ul>"
    )


def write_report(path: str | Path, results: dict, real_set, fake_set, train_set=None, audit=None) -> Path:
    """Write the HTML report of an evaluation to ``path`` (atomically)."""
    title = f"medfusion evaluation: {html.escape(results['fake'])}"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>",
        f"</head><body><h1>{title}</h1>",
        f"<p>Real: <code>{html.escape(results['real'])}</code> · synthetic: "
        f"<code>{html.escape(results['fake'])}</code> · images {results['image_size']} · "
        f"normalisation {html.escape(results['normalization'])} · "
        f"{html.escape(results['created'])}</p>",
        f"<p><b>Features: {html.escape(results['extractor'])}.</b> <span class='note'>FIDs from different "
        "extractors are not comparable; lower FID/KID and higher precision/recall/coverage are better."
        "</span></p>",
        "<h2>Metrics</h2>",
        _verdict(results),
        _table(results),
        "<h2>Precision and recall</h2>",
        _pr_plot(results),
    ]
    if results.get("intensity"):
        parts.append(_intensities(results["intensity"]))
    if results.get("diversity"):
        parts.append(
            "<h2>Diversity</h2><p class='note'>Mean pairwise MS-SSIM within each class (lower is more "
            "diverse; synthetic far above real means mode collapse), over the first images of each class "
            "and set (n); the real value is the reference.</p><table><tr><th>class</th>"
            "<th>real</th><th>synthetic</th><th>synthetic / real</th></tr>"
        )
        real_div, fake_div = results["diversity"].get("real", {}), results["diversity"].get("fake", {})
        for label in sorted(set(real_div) | set(fake_div)):
            entry = results["per_class"].get(label, {}).get("diversity", {})
            cells = "".join(
                f"<td>{significant(values[label])}{f' (n {entry[count]})' if count in entry else ''}</td>"
                if label in values
                else "<td>–</td>"
                for values, count in ((real_div, "n_real"), (fake_div, "n_fake"))
            )
            ratio = f"{significant(entry['ratio'])}x" if entry.get("ratio") is not None else "–"
            parts.append(f"<tr><th>{html.escape(label)}</th>{cells}<td>{ratio}</td></tr>")
        parts.append("</table>")
    if results.get("calibration"):
        parts.append(_calibration(results["calibration"]))
    if results.get("tstr"):
        parts.append(_utility(results["tstr"]))
    parts += ["<h2>Real and synthetic images</h2>", _grids(real_set, fake_set)]
    if results.get("pipeline"):
        parts.append(_pipeline(results["pipeline"]))
    if audit is not None and train_set is not None:
        memo = results["memorisation"]
        parts += [
            "<h2>Memorisation audit</h2>",
            f"<p>{memo['flagged']} of {len(audit.fake_to_train)} synthetic samples "
            f"({100 * memo['fraction_flagged']:.2f}%) are closer to a training image than "
            f"{100 * (1 - memo['quantile']):.0f}% of held-out real images are (threshold "
            f"{memo['threshold']:.4g}). Red: synthetic, blue: held-out real.</p>",
            _histogram(audit.fake_to_train, audit.heldout_to_train, audit.threshold),
            "<h3>Closest pairs (synthetic, training)</h3>",
            _closest_pairs(fake_set, train_set, audit),
        ]
    parts.append("</body></html>")
    text = "\n".join(parts)
    atomic_write_text(path, text)
    return Path(path)
