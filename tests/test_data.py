import torch

from mpocompress.data import digits


def test_digits_is_served_as_28x28_with_a_fixed_split():
    train, test = digits("train"), digits("test")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape == (1437, 1, 28, 28) and xte.shape == (360, 1, 28, 28)
    assert set(ytr.tolist()) == set(range(10)) and ytr.dtype == torch.int64
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-3  # normalised on the train split
    assert torch.equal(digits("test").tensors[0], xte)  # deterministic
    # the two splits are disjoint: no test image appears in the training set
    flat_train = {tuple(v.tolist()) for v in digits("train", image_size=8).tensors[0].flatten(1)[:, ::4]}
    overlap = sum(tuple(v.tolist()) in flat_train for v in digits("test", image_size=8).tensors[0].flatten(1)[:, ::4])
    assert overlap < 10  # a few duplicated digits exist in the source data itself


def test_digits_original_size():
    x, _ = digits("test", image_size=8).tensors
    assert x.shape[-2:] == (8, 8)
