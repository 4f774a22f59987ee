"""Sweep reports (transitional: re-exports dcdit_platform.report until it is split into this package)."""

from dcdit_platform.report import build_report

__all__ = ["build_report"]
