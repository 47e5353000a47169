"""Reports (月报季评) for the console: computed from the opened bundle by
:func:`exchange.audit.report.report_from_bundle` (which verifies it again) and rendered by
:mod:`exchange.audit.report_render` (inline SVG charts), once per period."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from exchange.audit import AuditError
from exchange.audit.console.bundle import LedgerBundle
from exchange.audit.report import Report, parse_period, report_from_bundle
from exchange.audit.report_render import (
    SummaryRow,
    chart_specs,
    render_html,
    render_svg,
    summary_rows,
)

#: reports kept per console process (periods asked for most recently)
CACHE_SIZE = 16


@dataclass(frozen=True)
class RenderedReport:
    report: Report
    summary: list[SummaryRow]
    charts: dict[str, str]  # name -> SVG markup from vl_convert (no script)
    titles: dict[str, str]


class ReportDesk:
    """The reports of one bundle, computed on demand and kept."""

    def __init__(self, bundle: LedgerBundle) -> None:
        self.bundle = bundle
        self._cache: dict[str, RenderedReport] = {}
        self._lock = threading.Lock()

    def get(self, period_text: str) -> RenderedReport:
        """The report of ``period_text`` (``2026-11`` or ``2026Q4``). Raises ``ValueError``
        for a bad period and :class:`~exchange.audit.AuditError` for a bundle that does not
        verify: a report is only computed from one that does."""
        period = parse_period(period_text)
        with self._lock:
            found = self._cache.get(period.label)
            if found is not None:
                return found
            if self.bundle.fault is not None:
                raise AuditError(self.bundle.fault)
            report = report_from_bundle(self.bundle.path, self.bundle.log, period)
            specs = chart_specs(report)
            titles = {name: _title(spec.get("title")) for name, spec in specs.items()}
            rendered = RenderedReport(
                report,
                summary_rows(report),
                {name: render_svg(spec) for name, spec in specs.items()},
                titles,
            )
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[period.label] = rendered
            return rendered

    def html(self, period_text: str) -> str:
        """The whole report as its self-contained HTML page."""
        rendered = self.get(period_text)
        return render_html(rendered.report, rendered.charts)


def _title(value: object) -> str:
    if isinstance(value, dict):
        value = value.get("text", "")
    return value if isinstance(value, str) else ""
