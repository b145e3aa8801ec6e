"""algos/functional.py's CompiledStep: a compile that fails leaves the caller eager with one
warning; the first compile of an update is announced once per process."""

from __future__ import annotations

import logging

import torch

from algos.functional import CompiledStep


def test_a_step_that_cannot_compile_warns_once_and_stays_eager(caplog):
    def branchy(x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow: no whole graph (fullgraph=True)
            return x + 1
        return x - 1

    step = CompiledStep(branchy, "test-branchy")
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        assert step(torch.ones(3)) is None
        assert step(torch.ones(3)) is None
    assert not step.active
    warnings = [r for r in caplog.records if "torch.compile of the test-branchy update failed" in r.message]
    assert len(warnings) == 1 and warnings[0].message.endswith("updating eagerly")


def test_the_first_compile_of_an_update_is_announced_once(caplog):
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    with caplog.at_level(logging.INFO, logger="asyncrl"):
        first, second = CompiledStep(double, "test-double"), CompiledStep(double, "test-double")
        torch.testing.assert_close(first(torch.ones(3)), torch.full((3,), 2.0))
        torch.testing.assert_close(first(torch.ones(3)), torch.full((3,), 2.0))
        torch.testing.assert_close(second(torch.ones(3)), torch.full((3,), 2.0))
    announced = [r for r in caplog.records if r.message.startswith("compiling the test-double update")]
    assert len(announced) == 1  # not again for the second step, nor for later calls
