"""The ordered stages of a build."""

from __future__ import annotations

from builder.run import Stage


def default_stages() -> list[Stage]:
    from builder.capture.stage import CaptureStage
    from builder.classify import ClassifyStage
    from builder.corpus.stage import CorpusStage
    from builder.exemplars import ExemplarsStage
    from builder.explain.stage import ExplainStage
    from builder.package import PackageStage
    from builder.simulate.stage import SimulateStage
    from builder.text import TextStage
    from builder.validate import ValidateStage

    return [
        CorpusStage(), TextStage(), CaptureStage(), ClassifyStage(), ExemplarsStage(), ExplainStage(), SimulateStage(),
        PackageStage(), ValidateStage(),
    ]


