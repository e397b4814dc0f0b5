"""No tests here any more: the static deployment checks are in test_deploy_*.py beside
this file, their shared helpers in deploy_files.py.

Kept only because tests/observability/test_real_server.py loads this file by path for
the metric contract (the names below); delete it once that test imports
tests.system.deploy_files instead.
"""

from __future__ import annotations

from tests.system.deploy_files import (
    DOCUMENTED_METRICS,
    metric_names_in_alert_rules,
    metric_names_in_dashboard,
    metric_types_from_exposition,
    undefined_metric_names,
)
from tests.system.deploy_files import load_alert_rules as _alert_rules
from tests.system.deploy_files import load_dashboard as _dashboard

__all__ = [
    "DOCUMENTED_METRICS",
    "_alert_rules",
    "_dashboard",
    "metric_names_in_alert_rules",
    "metric_names_in_dashboard",
    "metric_types_from_exposition",
    "undefined_metric_names",
]
