"""Sweep reports: the MLflow runs of a sweep become one row per run, evaluations ranked within their protocol, figures,
the router probe of each routed run's checkpoint and plain findings, written as HTML, Markdown and CSV.

    collect    MLflow -> rows           protocols  protocol identity and titles   ranking  groups, ranks, Pareto
    probes     checkpoints -> probes    figures    the PNGs                       findings the sentences
    contents   sweep -> Document, CSV   render     Document -> Markdown / HTML    build    build_report
"""

from dcdit_platform.reports.build import build_report, format_summary, resolve_store
from dcdit_platform.reports.collect import collect, find_parent
from dcdit_platform.reports.contents import CSV_COLUMNS, csv_records
from dcdit_platform.reports.findings import findings
from dcdit_platform.reports.probes import probe_checkpoint
from dcdit_platform.reports.protocols import PROTOCOL_KEYS, protocol_id
from dcdit_platform.reports.ranking import group_by_protocol, pareto_front

__all__ = ["build_report", "format_summary", "resolve_store", "collect", "find_parent", "csv_records",
           "CSV_COLUMNS", "findings", "probe_checkpoint", "PROTOCOL_KEYS", "protocol_id", "group_by_protocol",
           "pareto_front"]
