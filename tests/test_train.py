"""The training loop: schedule, Eqs. 10-11, freezing, gauge balancing, distillation, resume, NaN stop."""

import math
import re
import signal
import statistics

import pytest
import torch
import torch.nn.functional as F

from mpocompress.io.data import load_dataset
from mpocompress.errors import Interrupted, MPOCompressError
from mpocompress.nn import MPOLinear
from mpocompress.tensors import MPOShape, balance_cores, mpo_to_matrix, random_cores, tt_svd
from mpocompress.train import (
    TrainConfig, central_core_index, count_params, distillation_loss, evaluate, fit, freeze_, lr_at, mean_std,
    prepare_finetune_,
)  # fmt: skip
from mpocompress.models import build_model, build_mpo_net


@pytest.fixture(scope="module")
def digits_sets():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_lr_schedules():
    c = TrainConfig(epochs=4, lr=0.1)
    assert lr_at(c, 0, 10) == pytest.approx(0.1) and lr_at(c, 20, 10) == pytest.approx(0.05)
    assert lr_at(c, 39, 10) < 0.001
    s = TrainConfig(epochs=4, lr=0.1, schedule="step")
    assert [lr_at(s, k, 10) for k in (0, 19, 20, 30)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    w = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, schedule="constant")
    assert lr_at(w, 0, 10) == pytest.approx(0.01) and lr_at(w, 9, 10) == pytest.approx(0.1) and lr_at(w, 30, 10) == 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "learning rate"), ({"momentum": 1.0}, "momentum"),
     ({"schedule": "linear"}, "unknown schedule"), ({"warmup_epochs": 30.0}, "warm-up"),
     ({"batch_size": 0}, "batch size"), ({"distill_alpha": 2.0}, "distillation weight")],
)  # fmt: skip
def test_config_validation(kwargs, message):
    with pytest.raises(MPOCompressError, match=message):
        TrainConfig(**kwargs)


def test_mean_std_is_eqs_10_11():
    values = [0.981, 0.984, 0.979, 0.986, 0.983]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert mean_std([0.5]) == (0.5, None)


def test_balance_cores_keeps_the_matrix_and_evens_the_norms():
    w = torch.randn(24, 30, dtype=torch.float64)
    dec = tt_svd(w, (2, 3, 5), (2, 3, 4), max_bond=3)
    assert max(float(c.norm()) for c in dec.cores) / min(float(c.norm()) for c in dec.cores) > 3  # TT-SVD: skewed
    bal = balance_cores(dec.cores)
    torch.testing.assert_close(mpo_to_matrix(bal), mpo_to_matrix(dec.cores), rtol=1e-10, atol=1e-10)
    norms = [float(c.norm()) for c in bal]
    assert max(norms) / min(norms) == pytest.approx(1.0)
    assert [c.shape for c in bal] == [c.shape for c in dec.cores]


def test_prepare_finetune_keeps_outputs():
    layer = MPOLinear.from_cores(random_cores(MPOShape((4, 7, 7, 4), (4, 4, 4, 4), (4, 4, 4)), 0.3), torch.randn(256))
    x = torch.randn(5, 784)
    before = layer(x)
    prepare_finetune_(layer)
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-5)


def test_freeze_central_and_dense():
    model, _, _ = build_mpo_net("fc2", bond_dim=4)
    total = count_params(model)
    idx = central_core_index(model.fc1)
    assert model.fc1.cores[idx].numel() == max(c.numel() for c in model.fc1.cores) and idx in (1, 2)
    trainable = freeze_(model, ("central",))
    frozen = model.fc1.cores[central_core_index(model.fc1)].numel() + model.fc2.cores[central_core_index(model.fc2)].numel()
    assert trainable == total - frozen == count_params(model, trainable_only=True)
    lenet, _, _ = build_mpo_net("lenet5")
    only_mpo = freeze_(lenet, ("dense",))
    assert only_mpo == sum(p.numel() for n, p in lenet.named_parameters() if n.split(".")[0] in ("conv3", "fc1", "fc2"))
    with pytest.raises(MPOCompressError, match="no MPO layers"):
        freeze_(build_model("fc2"), ("central",))
    with pytest.raises(MPOCompressError, match="unknown part"):
        freeze_(model, ("edges",))


def test_distillation_loss_against_its_definition():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    temp = 3.0
    p = F.softmax(t / temp, 1)
    expected = (p * (p.log() - F.log_softmax(s / temp, 1))).sum(1).mean() * temp**2
    torch.testing.assert_close(distillation_loss(s, t, temp), expected)
    assert float(distillation_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_evaluate_matches_a_manual_count(digits_sets):
    _, test = digits_sets
    model = build_model("fc2").eval()
    acc, loss = evaluate(model, test, batch_size=7)
    x, y = test.tensors()
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_fit_learns_digits_and_reports_history(digits_sets):
    train, test = digits_sets
    model = build_model("fc2")
    seen = []
    result = fit(model, train, test, TrainConfig(epochs=3, lr=0.05), on_epoch=seen.append)
    assert result.accuracy > 0.9 and result.epochs == 3 and len(seen) == 3
    assert seen[-1].test_accuracy == result.accuracy and seen[0].train_loss > seen[-1].train_loss


def test_resume_is_bit_identical(digits_sets):
    train, test = digits_sets
    config = TrainConfig(epochs=3, lr=0.05, seed=5)
    torch.manual_seed(1)
    a, _, _ = build_mpo_net("fc2", bond_dim=4)
    states = []
    full = fit(a, train, test, config, save_state=states.append)
    assert [s["epoch"] for s in states] == [1, 2, 3]
    # a fresh process state: other weights, other global RNG; resume from the state after epoch 1
    torch.manual_seed(99)
    b, _, _ = build_mpo_net("fc2", bond_dim=4)
    resumed = fit(b, train, test, config, resume_state=states[0])
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert resumed.accuracy == full.accuracy and [h.test_loss for h in resumed.history] == [h.test_loss for h in full.history]


def test_nan_loss_stops_the_run(digits_sets):
    train, test = digits_sets
    states = []
    with pytest.raises(MPOCompressError, match="loss became (nan|inf)"):
        fit(build_model("fc2"), train, test, TrainConfig(epochs=2, lr=1e6, momentum=0.0), save_state=states.append)
    assert states == []  # no state from the diverged epoch: the last good checkpoint stays


def test_model_that_does_not_fit_the_data(digits_sets):
    train, test = digits_sets
    with pytest.raises(MPOCompressError, match="does not take digits images of shape 1x28x28"):
        fit(build_model("lenet5(in_channels=3)"), train, test, TrainConfig(epochs=1))


def test_distillation_run_uses_the_teacher(digits_sets):
    train, test = digits_sets
    teacher = build_model("fc2")
    fit(teacher, train, test, TrainConfig(epochs=2, lr=0.05))
    student, _, _ = build_mpo_net("fc2", bond_dim=4)
    r = fit(student, train, test, TrainConfig(epochs=2, lr=0.02, distill_alpha=1.0), teacher=teacher)
    assert r.accuracy > 0.5 and not any(p.requires_grad for p in teacher.parameters())
    assert math.isfinite(r.loss)


def test_stop_request_saves_mid_epoch_and_resume_is_bit_identical(digits_sets):
    """fit polls should_stop after every step; on a request it saves a mid-epoch state and raises
    Interrupted. Resuming from that state ends where the uninterrupted run ends, bit for bit."""
    train, test = digits_sets
    config = TrainConfig(epochs=2, lr=0.05, seed=2, batch_size=32)  # 45 steps per epoch
    torch.manual_seed(1)
    a, _, _ = build_mpo_net("fc2", bond_dim=3)
    full = fit(a, train, test, config)
    calls, states = [], []

    def stop_at_call_50():  # 45 steps + 1 check at the end of epoch 1, then 4 steps of epoch 2
        calls.append(1)
        return signal.SIGTERM if len(calls) == 50 else 0

    torch.manual_seed(1)
    b, _, _ = build_mpo_net("fc2", bond_dim=3)
    with pytest.raises(Interrupted, match="SIGTERM in epoch 2/2 after batch 4/45") as e:
        fit(b, train, test, config, save_state=states.append, should_stop=stop_at_call_50)
    assert e.value.exit_code == 143
    assert [(s["epoch"], s["batch"]) for s in states] == [(1, 0), (1, 4)] and states[-1]["partial"]["seen"] == 4 * 32
    torch.manual_seed(99)
    c, _, _ = build_mpo_net("fc2", bond_dim=3)
    resumed = fit(c, train, test, config, resume_state=states[-1])
    for (name, pa), pc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(pa, pc), name
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in full.history]


# ----------------------------------------------------------------------------- the user's own data


def _pairs(n=480, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 3, generator=g)).argmax(1)
    return x, y


class _NumpyPairs(torch.utils.data.Dataset):
    """A user's dataset: numpy features and int labels, item by item."""

    def __init__(self, x, y):
        self.x, self.y = x.numpy(), y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def test_fit_takes_a_dataloader_or_any_map_style_dataset_and_trains_the_same_way():
    """A DataLoader (its own batch size and shuffling aside), a TensorDataset and an item-by-item
    dataset give the same weights: the loop reads each by index in its own seeded order."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _pairs()
    train, test = TensorDataset(x[:400], y[:400]), TensorDataset(x[400:], y[400:])
    config = TrainConfig(epochs=4, batch_size=32, lr=0.1)
    nets = [_net() for _ in range(3)]
    results = [
        fit(nets[0], DataLoader(train, batch_size=7, shuffle=True), DataLoader(test), config),
        fit(nets[1], train, test, config),
        fit(nets[2], _NumpyPairs(x[:400], y[:400]), _NumpyPairs(x[400:], y[400:]), config),
    ]
    for net in nets[1:]:
        for a, b in zip(nets[0].parameters(), net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert results[0].accuracy > 0.8 and results[0].accuracy == results[1].accuracy == results[2].accuracy
    acc, loss = evaluate(nets[0], test)
    with torch.no_grad():
        logits = nets[0](x[400:])
    assert acc == pytest.approx(float((logits.argmax(1) == y[400:]).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y[400:])), rel=1e-5)


def test_data_fit_cannot_read_is_a_clear_error():
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(20), 0

    x, y = _pairs(40)
    config = TrainConfig(epochs=1, batch_size=8)
    cases = [
        (DataLoader(Stream()), "IterableDataset"),
        (Stream(), "IterableDataset"),
        (TensorDataset(x, y.float()), "class index"),
        (TensorDataset(x[:0], y[:0]), "empty"),
        ([x[0], x[1]], "(x, y) pairs"),
        (42, "cannot train on a int"),
    ]
    for data, fragment in cases:
        with pytest.raises(MPOCompressError, match=re.escape(fragment)):
            fit(_net(), data, TensorDataset(x, y), config)
