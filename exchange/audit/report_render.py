"""Rendering a report (月报季评): self-contained HTML with inline SVG charts, and a PDF.

The measures come from :mod:`exchange.audit.report`; this module only presents them. Charts are
Vega-Lite specifications rendered offline by ``vl_convert`` (SVG inline in the HTML, PNG in the
PDF); the HTML is a Jinja2 template shipped with the package (``report_templates/``) and loads
nothing from anywhere. The PDF uses fpdf2 with a CJK font found on the machine (Noto Sans CJK,
Debian package ``fonts-noto-cjk``), so Chinese headings and labels render.

What the console calls: :func:`render_html` (a page), :func:`chart_specs` and
:func:`render_svg` (the charts alone), :func:`summary_rows` (the main table).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from exchange.audit.report import MEASURES, NOTES, Measure, Report

__all__ = [
    "CJK_FONT",
    "LABELS",
    "FontNotFoundError",
    "SummaryRow",
    "chart_specs",
    "find_cjk_font",
    "render_html",
    "render_pdf",
    "render_png",
    "render_svg",
    "summary_rows",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REPORT_HTML = "report.html"
REPORT_PDF = "report.pdf"

#: where Debian's fonts-noto-cjk puts the font the PDF prefers
CJK_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
#: the Simplified Chinese face in the Noto Sans/Serif CJK collections
_NOTO_SC_INDEX = 2

#: each measure's heading: (Chinese, English)
LABELS: dict[str, tuple[str, str]] = {
    "computations": ("计算次数", "Computations"),
    "epsilon.spent": ("ε 消耗", "ε spent"),
    "epsilon.left": ("ε 剩余 (窗口内)", "ε left in the window"),
    "denials.policy": ("策略拒绝", "Policy denials"),
    "denials.authentication": ("认证拒绝", "Authentication rejections"),
    "denials.refused": ("其他拒绝", "Other refusals"),
    "psi.sessions": ("PSI 会话", "PSI sessions"),
    "psi.ids_sent": ("PSI 提交标识数", "PSI ids sent"),
    "psi.ids_sent.max": ("PSI 单次最多标识数", "PSI ids sent, largest session"),
    "psi.provider_ids.max": ("PSI 提供方集合最大规模", "PSI provider set, largest"),
    "psi.sessions_ended": ("PSI 会话终止", "PSI sessions ended"),
    "scorings": ("加密评分", "Encrypted scorings"),
    "scorings.entities": ("评分实体数", "Entities scored"),
    "grants.opened": ("授权开通", "Grants opened"),
    "grants.revoked": ("授权撤销", "Grants revoked"),
    "grants.expired": ("授权到期", "Grants expired"),
    "approval.latency.count": ("审批次数", "Approvals"),
    "approval.latency.median_ms": ("审批时延中位数 (毫秒)", "Approval latency, median (ms)"),
    "approval.latency.max_ms": ("审批时延最大值 (毫秒)", "Approval latency, max (ms)"),
    "suspensions": ("暂停", "Suspensions"),
    "reinstatements": ("恢复", "Reinstatements"),
    "throttles": ("限流", "Throttles"),
    "incidents.opened": ("事件开启", "Incidents opened"),
    "incidents.labelled": ("事件标注", "Incidents labelled"),
    "xborder.decisions": ("跨境决定", "Cross-border decisions"),
    "xborder.approvals": ("跨境合规文件", "Cross-border approvals recorded"),
    "reports.published": ("报告发布", "Reports published"),
}
#: measures whose rows do not add up over dimensions (the summary shows their largest value,
#: the smallest for what is left of a budget)
_NOT_ADDITIVE = frozenset(
    m for m in MEASURES if m.endswith((".max", ".max_ms", ".median_ms")) or m == "epsilon.left"
)
#: a count axis: whole numbers only
_COUNT = {
    "field": "value",
    "type": "quantitative",
    "title": "次数 count",
    "axis": {"tickMinStep": 1, "format": "d"},
}
_DENIALS = {
    "denials.policy": "策略 policy",
    "denials.authentication": "认证 authentication",
    "denials.refused": "其他 refused",
}


class FontNotFoundError(ValueError):
    """No CJK font on this machine for the PDF."""


# -- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    """A measure and key over the whole period: summed over months and dimensions (the largest
    value for maxima and medians)."""

    measure: str
    label_zh: str
    label_en: str
    key: str
    value: str


def summary_rows(report: Report) -> list[SummaryRow]:
    """One row per measure and key, in the report's measure order."""
    totals: dict[tuple[str, str], Decimal] = {}
    for m in report.rows:
        k = (m.measure, m.key)
        value = Decimal(m.value)
        if m.measure == "epsilon.left":  # the tightest
            totals[k] = min(totals.get(k, value), value)
        elif m.measure in _NOT_ADDITIVE:
            totals[k] = max(totals.get(k, value), value)
        else:
            totals[k] = totals.get(k, Decimal(0)) + value
    order = {name: i for i, name in enumerate(MEASURES)}
    rows = []
    for (measure, key), value in sorted(totals.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        zh, en = LABELS.get(measure, (measure, measure))
        rows.append(SummaryRow(measure, zh, en, key, _plain(value)))
    return rows


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _short(key_id: str) -> str:
    """A key id as tables show it (the first 12 hex digits)."""
    return key_id[:12] + "…" if len(key_id) > 16 else key_id or "—"


# -- charts -----------------------------------------------------------------------------------


def _bar(
    title: str, values: list[dict[str, Any]], x: dict[str, Any], y: dict[str, Any], color: str
) -> dict[str, Any]:
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title,
        "data": {"values": values},
        "mark": "bar",
        "width": 420,
        "encoding": {
            "x": x,
            "y": y,
            "color": {"field": color, "type": "nominal", "title": None},
        },
        "config": {"font": "Noto Sans CJK SC, sans-serif", "view": {"stroke": None}},
    }


def _sums(rows: Sequence[Measure], *fields: str) -> list[dict[str, Any]]:
    totals: dict[tuple[str, ...], Decimal] = {}
    for m in rows:
        k = tuple(getattr(m, f) for f in fields)
        totals[k] = totals.get(k, Decimal(0)) + Decimal(m.value)
    return [
        {**dict(zip(fields, k, strict=True)), "value": float(v)} for k, v in sorted(totals.items())
    ]


def chart_specs(report: Report) -> dict[str, dict[str, Any]]:
    """Vega-Lite specifications of the report's charts, by name; a chart with no data is left
    out. ``computations``: per zone and kind; ``denials``: by reason and class;
    ``epsilon``: ε spent per consumer."""
    specs: dict[str, dict[str, Any]] = {}
    computations = _sums(report.select("computations"), "zone", "key")
    if computations:
        specs["computations"] = _bar(
            "各专区计算次数 Computations per zone and kind",
            computations,
            {"field": "zone", "type": "nominal", "title": "专区 zone", "axis": {"labelAngle": 0}},
            _COUNT,
            "key",
        )
    denials: list[dict[str, Any]] = []
    for measure, name in _DENIALS.items():
        denials += [{**d, "class": name} for d in _sums(report.select(measure), "key")]
    if denials:
        specs["denials"] = _bar(
            "拒绝原因 Denials by reason",
            denials,
            _COUNT,
            {"field": "key", "type": "nominal", "title": "原因 reason", "sort": "-x"},
            "class",
        )
    epsilon = [
        {**d, "consumer": _short(d["consumer"])}
        for d in _sums(report.select("epsilon.spent"), "consumer", "zone")
    ]
    if epsilon:
        specs["epsilon"] = _bar(
            "各使用方 ε 消耗 ε spent per consumer",
            epsilon,
            {"field": "value", "type": "quantitative", "title": "ε"},
            {"field": "consumer", "type": "nominal", "title": "使用方 consumer"},
            "zone",
        )
    return specs


_XMLNS = re.compile(r'\s+xmlns(?::xlink)?="[^"]*"')


def render_svg(spec: dict[str, Any]) -> str:
    """A chart as SVG markup for inline use in HTML (no namespace URLs: HTML needs none)."""
    import vl_convert

    svg: str = vl_convert.vegalite_to_svg(spec)
    return _XMLNS.sub("", svg, count=2)


def render_png(spec: dict[str, Any], scale: float = 2) -> bytes:
    """A chart as a PNG image (for the PDF)."""
    import vl_convert

    png: bytes = vl_convert.vegalite_to_png(spec, scale=scale)
    return png


# -- HTML -------------------------------------------------------------------------------------


def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("exchange.audit", "report_templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _context(report: Report) -> dict[str, Any]:
    kind_zh = "月报" if report.period.kind == "month" else "季评"
    kind_en = "Monthly report" if report.period.kind == "month" else "Quarterly report"
    return {
        "report": report,
        "title_zh": f"{kind_zh} {report.period.label}",
        "title_en": f"{kind_en} {report.period.label}",
        "digest": report.digest(),
        "summary": summary_rows(report),
        "labels": LABELS,
        "notes": [NOTES.get(n, n) for n in report.notes],
        "short": _short,
    }


def render_html(report: Report, charts: dict[str, str] | None = None) -> str:
    """The report as one self-contained HTML page: headings in Chinese and English, the
    summary and detail tables, the charts as inline SVG (``charts``: name -> SVG already
    rendered, else rendered here), no reference to anything outside the page."""
    if charts is None:
        charts = {name: render_svg(spec) for name, spec in chart_specs(report).items()}
    template = _environment().get_template("report.html")
    page: str = template.render(**_context(report), charts=charts)
    return page


# -- PDF --------------------------------------------------------------------------------------


def find_cjk_font() -> tuple[Path, int]:
    """A CJK font file and the index of its Simplified Chinese face (in a collection):
    Noto Sans CJK where Debian installs it, else what fontconfig lists for Chinese.
    :class:`FontNotFoundError` if there is none."""
    if CJK_FONT.is_file():
        return CJK_FONT, _NOTO_SC_INDEX
    fc_list = shutil.which("fc-list")
    if fc_list is not None:
        try:
            listed = subprocess.run(
                [fc_list, "-f", "%{file}|%{index}|%{family}\n", ":lang=zh-cn"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        found: list[tuple[bool, str, int]] = []
        for line in listed.splitlines():
            file, _, rest = line.partition("|")
            number, _, family = rest.partition("|")
            if file.lower().endswith((".ttc", ".otf", ".ttf")) and number.isdigit():
                found.append((" SC" not in family, file, int(number)))
        if found:
            _, file, face = min(found)
            return Path(file), face
    raise FontNotFoundError(
        "no CJK font for the PDF: install the Debian package fonts-noto-cjk "
        f"(it provides {CJK_FONT})"
    )


def render_pdf(report: Report, font: tuple[Path, int] | None = None) -> bytes:
    """The report as a PDF for the review meeting: headings, the summary table, the charts
    and the detail table, in a CJK font (``font``: a file and face index; found with
    :func:`find_cjk_font` if not given)."""
    from io import BytesIO

    from fpdf import FPDF
    from fpdf.fonts import FontFace

    path, index = font if font is not None else find_cjk_font()
    context = _context(report)
    pdf = FPDF(orientation="portrait", unit="mm", format="A4")
    pdf.set_creator("zonex")
    pdf.set_title(f"{context['title_zh']} / {context['title_en']}")
    pdf.set_creation_date(report.period.start)  # the same metadata on every run
    pdf.add_font("cjk", fname=path, collection_font_number=index)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("cjk", size=18)
    pdf.cell(text=f"{context['title_zh']} / {context['title_en']}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("cjk", size=9)
    facts = [
        f"期间 Period: {report.period.start_time} – {report.period.end_time}",
        f"账本条目 Bundle entries: {report.entries}; 本期 in the period: "
        f"{report.entries_in_period}"
        + (f" (seq {report.first_seq}–{report.last_seq})" if report.first_seq is not None else ""),
        f"账本根 Bundle root: {report.bundle_root or '—'}",
        f"报告摘要 Report digest (SHA-256): {context['digest']}",
    ]
    for line in facts + [f"注 Note: {n}" for n in context["notes"]]:
        pdf.multi_cell(0, 5, text=line, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    heading = FontFace(emphasis=None, fill_color=(230, 236, 245))

    def section(title: str) -> None:
        pdf.set_font("cjk", size=13)
        pdf.cell(text=title, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("cjk", size=8)
        pdf.ln(1)

    section("汇总 Summary")
    with pdf.table(
        col_widths=(60, 70, 40), text_align=("LEFT", "LEFT", "RIGHT"), headings_style=heading
    ) as table:
        table.row(["指标 Measure", "类别/原因 Kind or reason", "数值 Value"])
        for s in context["summary"]:
            table.row([f"{s.label_zh} {s.label_en}", s.key or "—", s.value])
    for name, spec in chart_specs(report).items():
        pdf.ln(4)
        pdf.image(BytesIO(render_png(spec)), w=min(170, pdf.epw))
        del name
    pdf.add_page()
    section("明细 Details")
    with pdf.table(
        col_widths=(14, 30, 14, 8, 26, 24, 32, 14),
        text_align=("LEFT",) * 7 + ("RIGHT",),
        headings_style=heading,
    ) as table:
        table.row(["月份 month", "指标 measure", "专区 zone", "级别", "目的 purpose",
                   "使用方 consumer", "类别 kind", "数值 value"])  # fmt: skip
        for m in report.rows:
            table.row(
                [
                    m.period,
                    m.measure,
                    m.zone or "—",
                    m.level or "—",
                    m.purpose or "—",
                    _short(m.consumer),
                    m.key or "—",
                    m.value,
                ]
            )
    return bytes(pdf.output())


def write_report(report: Report, out_dir: Path) -> list[str]:
    """Write ``report.json`` (the canonical measures), ``report.csv``, ``report.html`` and
    ``report.pdf`` to ``out_dir``; the names written. Raises :class:`FontNotFoundError` (with
    the first three written) when the machine has no CJK font for the PDF."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_bytes(report.canonical())
    (out_dir / REPORT_CSV).write_text(report.to_csv(), "utf-8", newline="")
    (out_dir / REPORT_HTML).write_text(render_html(report), "utf-8")
    written = [REPORT_JSON, REPORT_CSV, REPORT_HTML]
    try:
        font = find_cjk_font()
    except FontNotFoundError as exc:
        raise FontNotFoundError(
            f"{exc}; {', '.join(written)} written to {out_dir}, no PDF"
        ) from None
    (out_dir / REPORT_PDF).write_bytes(render_pdf(report, font))
    return [*written, REPORT_PDF]
