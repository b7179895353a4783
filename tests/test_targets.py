"""The training targets on real MNIST (minutes each: marked slow, run with `python -m pytest -m slow`)."""

import pytest
import torch

from mpocompress.io.data import load_dataset
from mpocompress.compress import CompressionConfig, compress_, summarize
from mpocompress.train import TrainConfig, fit, prepare_finetune_
from mpocompress.models import build_model, build_mpo_net

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load_dataset("mnist", "train", shared_data), load_dataset("mnist", "test", shared_data)


def test_mpo_net_fc2_d16_from_scratch(mnist):
    """Fig. 2: the MPO-Net FC2 at D=16 reaches the dense FC2 (98.35 +- 0.2 %) with rho < 0.08."""
    torch.manual_seed(0)
    model, _, _ = build_mpo_net("fc2", bond_dim=16)
    result = fit(model, *mnist, TrainConfig(epochs=20))
    assert result.accuracy >= 0.980 and summarize(model)["rho"] < 0.08


@pytest.mark.xfail(strict=True, reason="3 epochs end at 96-97.5 % over about 40 recipes, the best averaging 97.2-97.3 % (docs/results.md)")
def test_converted_fc2_d4_recovers_in_three_epochs(mnist):
    """A dense FC2 converted at D=4 with the paper's shapes recovers 97.5 % within 3 fine-tuning epochs."""
    torch.manual_seed(0)
    dense = build_model("fc2")
    fit(dense, *mnist, TrainConfig(epochs=20))
    model = build_model("fc2")
    model.load_state_dict(dense.state_dict())
    compress_(model, CompressionConfig(bond_dim=4, shapes={"fc1": ((4, 7, 7, 4), (4, 4, 4, 4)), "fc2": ((4, 4, 4, 4), (1, 1, 10, 1))}))
    prepare_finetune_(model)
    result = fit(model, *mnist, TrainConfig(epochs=3, lr=0.02), teacher=dense)
    assert result.accuracy >= 0.975
