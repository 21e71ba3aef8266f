"""Helpers shared by the data tests (synthetic scenes, loaders, exporter)."""
import pytest

from kd_ref import export, synthetic

SIZE = (64, 80)


def scenes(split="train", length=4, seed=0):
    return synthetic.SyntheticScenes(split, seed=seed, size=SIZE, length=length)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every export format of the same 4 train + 2 val scenes."""
    root = tmp_path_factory.mktemp("exported")
    for name in export.EXPORTERS:
        export.export(name, str(root / name), num_train=4, num_val=2, size=SIZE, seed=0)
    return root
