"""Render a report: HTML (the main one: one self-contained file, printable), Markdown, JSON, PDF.

HTML and Markdown come from the Jinja2 templates in ``templates/`` and the charts from
``charts.py``; JSON is the model itself (docs/report.schema.json); PDF is WeasyPrint's rendering
of the same HTML, with its print stylesheet.
"""

from __future__ import annotations

from typing import Any

from drkit.config.durations import format_duration
from drkit.errors import ReportPdfUnavailable
from drkit.report.charts import COLORS, Point, Series, bytes_label, calendar, time_chart
from drkit.report.model import Report
from drkit.report.period import Period, cadence_periods

FORMATS = ("html", "pdf", "md", "json")


def render_json(report: Report) -> str:
    return report.model_dump_json(indent=2) + "\n"


def render_html(report: Report) -> str:
    return (
        _environment(autoescape=True)
        .get_template("report.html.j2")
        .render(r=report, charts=charts(report))
    )


def render_markdown(report: Report) -> str:
    return _environment(autoescape=False).get_template("report.md.j2").render(r=report)


def render_pdf(html: str) -> bytes:
    """The HTML as PDF pages (WeasyPrint, which needs the Pango library)."""
    try:
        from weasyprint import HTML  # type: ignore[import-not-found,unused-ignore]
    except (ImportError, OSError) as exc:
        raise ReportPdfUnavailable(
            f"cannot render PDF: WeasyPrint is not usable ({exc})",
            hint="pip install 'drkit[pdf]' and the Pango library (Debian: apt-get install"
            " libpango-1.0-0 libpangoft2-1.0-0), or print the HTML report",
        ) from None
    # No base URL and nothing to fetch: the HTML is self-contained; a fetcher that refuses
    # keeps it that way even if a record's text held a URL.
    pdf: bytes = HTML(string=html, url_fetcher=_refuse).write_pdf()
    return pdf


def _refuse(url: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    raise ValueError(f"the report fetches nothing ({url!r})")


def charts(report: Report) -> dict[str, str]:
    """Every chart of the report, as inline SVG, by name."""
    start, end = report.period.start, report.period.end
    drills = [d for d in report.drills if d.authentic and d.started_at is not None]
    found = {}
    for which in ("rto", "rpo"):
        points = []
        for d in drills:
            objective = getattr(d, which)
            if objective is None or objective.achieved_seconds is None or d.started_at is None:
                continue
            color = COLORS["fail"] if objective.met is False else COLORS["pass"]
            points.append(Point(d.started_at, objective.achieved_seconds, d.id, color))
        found[which] = time_chart(
            f"{which.upper()} achieved per drill",
            [Series("drill", COLORS["pass"], points)],
            start,
            end,
            target=report.targets[f"{which}_seconds"],
            target_label=f"{which.upper()} target",
            chart_id=f"chart-{which}",
        )
    by_type: dict[str, Series] = {t: Series(t, COLORS[t]) for t in ("full", "diff", "incr")}
    sizes: dict[str, Series] = {t: Series(t, COLORS[t]) for t in ("full", "diff", "incr")}
    for b in report.backups.items:
        by_type[b.type].points.append(Point(b.start, b.duration_seconds, b.label))
        sizes[b.type].points.append(Point(b.start, b.stored, b.label))
    found["duration"] = time_chart(
        "Backup duration", list(by_type.values()), start, end, chart_id="chart-duration"
    )
    found["size"] = time_chart(
        "Backup size stored",
        list(sizes.values()),
        start,
        end,
        fmt=bytes_label,
        chart_id="chart-size",
    )
    age = Series(
        "newest backup age",
        COLORS["age"],
        [Point(a.at, a.age_seconds, a.backup or "none") for a in report.backups.newest_age],
    )
    wal = Series(
        "newest WAL age (at drills)",
        COLORS["wal"],
        [
            Point(e.at, e.wal_age_seconds, f"{e.drill} {e.repo}")
            for e in report.copies.exposure
            if e.wal_age_seconds is not None
        ],
    )
    found["exposure"] = time_chart(
        "Exposure: newest backup and WAL age",
        [age, wal],
        start,
        end,
        target=report.targets["rpo_seconds"],
        target_label="RPO target",
        chart_id="chart-exposure",
    )
    kinds = list(dict.fromkeys(c.kind for c in report.cadence))
    months = cadence_periods("monthly", Period(start, end, report.period.label))
    cells: dict[tuple[str, str], tuple[str, str]] = {}
    for c in report.cadence:
        for month in months:
            if c.start <= month.start < c.end:
                drills_text = ", ".join(c.drills) or "no drill"
                cells[(c.kind, month.label)] = (c.status, f"{c.kind} {c.period}: {drills_text}")
    found["cadence"] = calendar("Drill cadence", kinds, [m.label for m in months], cells)
    return found


def _markdown_cell(value: object) -> str:
    """Free text (a finding, a check's detail, an error) inside a Markdown table row or list
    item: a '|' would end the cell and a newline the row."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _environment(*, autoescape: bool) -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("drkit.report", "templates"),
        autoescape=autoescape,  # noqa: S701 - autoescape is on for HTML, off for Markdown
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = lambda v: "-" if v is None else format_duration(v)
    env.filters["size"] = lambda v: "-" if v is None else bytes_label(v)
    env.filters["when"] = lambda v: "-" if v is None else v.strftime("%Y-%m-%d %H:%M UTC")
    env.filters["day"] = lambda v: "-" if v is None else v.strftime("%Y-%m-%d")
    env.filters["cell"] = _markdown_cell
    env.filters["met"] = lambda v: {True: "met", False: "MISSED", None: "not measured"}[v]
    return env
