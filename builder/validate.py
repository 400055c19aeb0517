"""The validate stage: run `validation` over the packaged folder and fail on any failure."""

from __future__ import annotations

from pathlib import Path

from builder.errors import StageError
from builder.io import write_text
from builder.run import RunContext


class ValidateStage:
    name = "validate"
    version = "1"
    sections = ()

    def source_fingerprint(self, ctx: RunContext) -> str:
        return ""

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [ctx.run_dir.path("validation.txt")]

    def run(self, ctx: RunContext) -> dict[str, int]:
        from validation import validate_dataset

        report = validate_dataset(ctx.run_dir.dataset)
        write_text(ctx.run_dir.path("validation.txt"), report.render() + "\n")  # the full report, pass or fail
        if not report.ok:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures[:3])
            raise StageError(
                f"the dataset in {ctx.run_dir.dataset} failed {len(report.failures)} checks ({failed}); "
                f"full report: {ctx.run_dir.path('validation.txt')}"
            )
        return {"checks": len(report.checks), "failed": 0}
