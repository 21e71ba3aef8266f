"""Helpers shared by the end-to-end training tests."""
import pytest

import train
from kd_ref import engine


def train_crashing_in_step(monkeypatch, iteration: int, argv: list) -> None:
    """Run ``train.main(argv)`` until it crashes in the 0-based ``iteration``, after that step's forward and
    before its update, so the checkpoint on disk is the last one written before it (as a killed job leaves)."""
    real_check = engine._check_finite

    def crash(losses, at):
        if at == iteration:
            raise KeyboardInterrupt
        real_check(losses, at)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "_check_finite", crash)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
