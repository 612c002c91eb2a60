"""The end-to-end job of `make quickstart` / `bebop-trl quickstart`: head training, measured acceptance and speed,
and a short GRPO run, written up in a report."""

from .report import write_report
from .run import run_quickstart
from .settings import QuickstartSettings


__all__ = ["QuickstartSettings", "run_quickstart", "write_report"]
