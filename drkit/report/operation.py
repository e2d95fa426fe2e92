"""drkit report: the DR exercise report of a period, from the repositories alone.

``ReportOperation(settings, request).run()`` reads the facts (``facts.gather``), builds the
report model (``build.build_report``, pure), renders each asked format and writes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drkit import __version__
from drkit.config.settings import Settings
from drkit.errors import ConfigError, ReportPdfUnavailable
from drkit.report.build import Context, build_report
from drkit.report.facts import gather
from drkit.report.model import Report
from drkit.report.period import Period, quarter_of
from drkit.report.render import FORMATS, render_html, render_json, render_markdown, render_pdf
from drkit.result import OperationResult, Stopwatch

_SUFFIX = {"html": "html", "pdf": "pdf", "md": "md", "json": "json"}


@dataclass(frozen=True)
class ReportRequest:
    period: Period | None = None  # None: the current quarter
    formats: tuple[str, ...] = ("html", "json")
    out: Path = Path(".")
    repo: str | None = None  # read from this repository (default: the first readable)
    now: datetime | None = None  # the clock (tests and reproductions); default: now


@dataclass(kw_only=True)
class ReportResult(OperationResult):
    report: Report
    paths: dict[str, Path] = field(default_factory=dict)  # format -> file written

    def _data(self) -> dict[str, Any]:
        return {
            "period": self.report.period.label,
            "verdict": self.report.summary.verdict,
            "verdict_line": self.report.summary.verdict_line,
            "files": {fmt: str(path) for fmt, path in self.paths.items()},
        }


class ReportOperation:
    def __init__(self, settings: Settings, request: ReportRequest) -> None:
        self.settings = settings
        self.request = request

    def run(self) -> ReportResult:
        """Write the report; raises ReportPdfUnavailable (after writing every other format)
        when a PDF was asked for and WeasyPrint cannot run."""
        now = self.request.now or datetime.now(UTC)
        period = self.request.period or quarter_of(now)
        self._check_formats()
        phases: dict[str, float] = {}
        clock = Stopwatch(phases)
        # Read every fact from the repositories
        facts = gather(self.settings, period, self.request.repo)
        clock.lap("read")
        # Build the report (pure)
        result = ReportResult(report=build_report(facts, self._context(period, now)), phases=phases)
        clock.lap("build")
        # Render and write each format
        pdf_error = self._write(result)
        clock.lap("render")
        if pdf_error is not None:
            written = ", ".join(str(p) for p in result.paths.values())
            raise ReportPdfUnavailable(
                f"{pdf_error.message}; written: {written or 'nothing'}", hint=pdf_error.hint
            )
        return result

    def _check_formats(self) -> None:
        unknown = [f for f in self.request.formats if f not in FORMATS]
        if unknown:
            raise ConfigError(
                f"unknown report format '{unknown[0]}'", hint=f"formats: {', '.join(FORMATS)}"
            )

    def _context(self, period: Period, now: datetime) -> Context:
        cadence = self.settings.report.cadence.model_dump(by_alias=True)
        return Context(
            period=period,
            now=now,
            rto_seconds=self.settings.drill.rto.total_seconds(),
            rpo_seconds=self.settings.drill.rpo.total_seconds(),
            cadence=cadence,
            drkit_version=__version__,
            config_digest=config_digest(self.settings),
            host=socket.gethostname(),
        )

    def _write(self, result: ReportResult) -> ReportPdfUnavailable | None:
        """Write every asked format; a PDF that cannot be rendered is returned, not raised, so
        the other formats are written first."""
        report = result.report
        out = self.request.out
        out.mkdir(parents=True, exist_ok=True)
        stem = f"drkit-report-{report.period.label.replace('..', '_')}"
        html: str | None = None
        pdf_error = None
        for fmt in dict.fromkeys(self.request.formats):
            try:
                if fmt == "json":
                    data: bytes = render_json(report).encode()
                elif fmt == "md":
                    data = render_markdown(report).encode()
                else:
                    html = html or render_html(report)
                    data = html.encode() if fmt == "html" else render_pdf(html)
            except ReportPdfUnavailable as exc:
                pdf_error = exc
                continue
            path = out / f"{stem}.{_SUFFIX[fmt]}"
            _write_file(path, data)
            result.paths[fmt] = path
        return pdf_error


def config_digest(settings: Settings) -> str:
    """sha256 of the effective settings (file, environment and flags merged; secrets masked),
    so two reports can be told to come from the same configuration."""
    dumped = settings.model_dump(mode="json")
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` whole (a reader never sees half a report); never through a symlink."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
