"""``--metric NAME[:key=value,...]`` as a click type: parsed and checked against the metric's signature when the
command line is read, so a wrong name or option is a usage error (exit 2) before anything is loaded."""

from __future__ import annotations

from typing import Any

import click

from geomprobe.errors import ConfigurationError
from geomprobe.probe.metric_spec import parse_metric

__all__ = ["MetricOption", "METRIC"]


class MetricOption(click.ParamType):
    """A metric with its options; the value is ``(name, options)``."""

    name = "metric"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_metric(value)
        except ConfigurationError as e:
            self.fail(str(e), param, ctx)


METRIC = MetricOption()
