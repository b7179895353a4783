import os

import torch

from mpocompress.io.data import digits


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


# ----------------------------------------------------------------------------- real MNIST / Fashion-MNIST

import gzip  # noqa: E402
import pickle  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402

from mpocompress.io.data import ImageSet, batch_indices, load_dataset, parse_normalize
from mpocompress.io.data.images import _crop_flip  # noqa: E402
from mpocompress.errors import MPOCompressError  # noqa: E402


def test_mnist_from_the_original_files(shared_data):
    train, test = load_dataset("mnist", "train", shared_data), load_dataset("mnist", "test", shared_data)
    assert len(train) == 60000 and len(test) == 10000
    assert train.x.dtype == torch.uint8 and train.image_shape == (1, 28, 28)
    assert train.y[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first training labels
    assert torch.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, _ = train.batch(torch.arange(20000))  # normalised with the standard MNIST statistics
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    assert not train.augment and not test.augment


def test_fashion_mnist_from_the_original_files(shared_data, monkeypatch):
    monkeypatch.setenv("MPOCOMPRESS_DATA", str(shared_data))  # found through the environment variable
    train = load_dataset("fashion-mnist", "train")
    assert len(train) == 60000 and torch.bincount(train.y).tolist() == [6000] * 10
    x, _ = train.batch(torch.arange(20000))
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


def _write_idx(folder, stem, magic, dims, payload, compress=True):
    data = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload
    path = folder / (stem + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _tiny_mnist(folder, n=6, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, (img, lbl) in {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():  # fmt: skip
        _write_idx(folder, img, 2051, (n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes(), compress)
        _write_idx(folder, lbl, 2049, (n,), bytes(range(n)), compress)


def test_idx_reader_accepts_plain_and_gzip_files_in_either_layout(tmp_path):
    _tiny_mnist(tmp_path / "mnist")  # root/mnist/...
    assert len(load_dataset("mnist", "train", tmp_path)) == 6
    _tiny_mnist(tmp_path / "flat", compress=False)  # files directly in the folder, uncompressed
    ds = load_dataset("mnist", "test", tmp_path / "flat")
    assert ds.y.tolist() == list(range(6))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "expected train-images-idx3-ubyte.gz"),
        ("magic", "magic number"),
        ("truncated", "header promises"),
        ("not_gzip", "corrupt"),
        ("labels", "labels outside 0..9"),
        ("count", "6 images but 5 labels"),
    ],
)
def test_broken_idx_files_are_named(tmp_path, damage, message):
    root = tmp_path / "mnist"
    _tiny_mnist(root)
    img = root / "train-images-idx3-ubyte.gz"
    if damage == "missing":
        img.unlink()
    elif damage == "magic":
        _write_idx(root, "train-images-idx3-ubyte", 2049, (6, 28, 28), bytes(6 * 784))
    elif damage == "truncated":
        _write_idx(root, "train-images-idx3-ubyte", 2051, (6, 28, 28), bytes(5 * 784))
    elif damage == "not_gzip":
        img.write_bytes(b"\x1f\x8b\x08garbage")
    elif damage == "labels":
        _write_idx(root, "train-labels-idx1-ubyte", 2049, (6,), bytes([0, 1, 2, 3, 4, 12]))
    elif damage == "count":
        _write_idx(root, "train-labels-idx1-ubyte", 2049, (5,), bytes(5))
    with pytest.raises(MPOCompressError, match=message):
        load_dataset("mnist", "train", tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10, SVHN (original formats)


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"batch", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"f.png"] * n}  # fmt: skip
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(folder / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test_batch = _cifar_batch(folder / "test_batch", 3, 9)
    train = load_dataset("cifar10", "train", tmp_path)
    assert len(train) == 20 and train.image_shape == (3, 32, 32)
    assert train.y.tolist() == sum((b[b"labels"] for b in batches), [])
    # channel-major rows of 1024 pixels: pixel (c, r, q) is data[c * 1024 + r * 32 + q]
    assert int(train.x[5, 2, 3, 4]) == int(batches[1][b"data"][1, 2 * 1024 + 3 * 32 + 4])
    assert train.augment and train.flip and train.crop_pad == 4
    test = load_dataset("cifar10", "test", tmp_path)
    assert not test.augment and test.y.tolist() == test_batch[b"labels"]
    assert not load_dataset("cifar10", "train", tmp_path, augment=False).augment


def test_cifar10_loader_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(MPOCompressError, match="corrupt or not a CIFAR-10"):
        load_dataset("cifar10", "train", tmp_path)
    assert not marker.exists()


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10]], dtype=np.uint8)  # SVHN writes the digit 0 as 10
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", "test", tmp_path)
    assert ds.y.tolist() == [0, 1, 2, 9, 0]
    assert int(ds.x[3, 1, 7, 8]) == int(x[7, 8, 1, 3])  # (N, C, H, W) from MATLAB's (H, W, C, N)
    with pytest.raises(MPOCompressError, match="train_32x32.mat"):
        load_dataset("svhn", "train", tmp_path)


# ----------------------------------------------------------------------------- tensors files


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_tensor_files(tmp_path, suffix):
    x = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(50) % 3
    path = tmp_path / f"set{suffix}"
    if suffix == ".pt":
        torch.save({"x": x, "y": y}, path)
    elif suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        safetensors.torch.save_file({"x": x, "y": y}, str(path))
    train, test = load_dataset(str(path), "train"), load_dataset(str(path), "test")
    assert len(train) == 40 and len(test) == 10 and train.num_classes == 3
    assert set(train.y.tolist()) | set(test.y.tolist()) == {0, 1, 2}
    xt, _ = train.tensors()
    torch.testing.assert_close(xt, train.x.float() / 255)  # a file's values are served as they are (uint8 scaled to [0, 1])
    xt, _ = load_dataset(str(path), "train", normalize="dataset").tensors()
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std()) - 1) < 0.05  # normalised on the train split
    xt, _ = load_dataset(str(path), "train", normalize=(0.5, 0.25)).tensors()
    torch.testing.assert_close(xt, (train.x.float() / 255 - 0.5) / 0.25)


def test_served_size_channels_and_normalization():
    """--image-size renders digits at that size (8: scikit-learn's own images) and resizes others;
    --channels repeats gray images or averages colour ones; --normalize none serves [0, 1] values."""
    from sklearn.datasets import load_digits

    eight = load_dataset("digits", "test", image_size=8, normalize="none")
    assert eight.image_shape == (1, 8, 8)
    raw = torch.from_numpy(load_digits().images).float() / 16  # the bundled 8x8 images, values 0..16
    x, _ = eight.tensors()
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert any(torch.allclose(x[0, 0], r, atol=1e-6) for r in raw)  # exactly one of scikit-learn's images
    three = load_dataset("digits", "test", channels=3, image_size=32)
    x3, _ = three.tensors()
    assert three.image_shape == (3, 32, 32) and x3.shape == (360, 3, 32, 32)
    torch.testing.assert_close(x3[:, 0], x3[:, 2])
    gray = ImageSet("rgb", "test", torch.rand(4, 3, 10, 10), torch.zeros(4, dtype=torch.long), (0.0,), (1.0,), channels=1, size=5)
    xg, _ = gray.tensors()
    ref = torch.nn.functional.interpolate(gray.x, size=(5, 5), mode="bilinear", antialias=True).mean(1, keepdim=True)
    torch.testing.assert_close(xg, ref)
    for kwargs, fragment in [({"channels": 2}, "--channels 2"), ({"image_size": 0}, "image size must be"), ({"normalize": "z"}, "unknown normalization")]:
        with pytest.raises(MPOCompressError, match=fragment):
            load_dataset("digits", "test", **kwargs)
    assert parse_normalize("0.1307,0.3081") == (0.1307, 0.3081) and parse_normalize("None") == "none"
    for bad in ("1,0", "a,b", "1,2,3", "nan,1"):
        with pytest.raises(MPOCompressError, match="normalize"):
            parse_normalize(bad)


def test_tensor_file_with_explicit_splits(tmp_path):
    path = tmp_path / "split.pt"
    torch.save({"x_train": torch.randn(30, 5), "y_train": torch.arange(30) % 2,
                "x_test": torch.randn(7, 5), "y_test": torch.arange(7) % 2}, path)  # fmt: skip
    test = load_dataset(str(path), "test")
    assert len(test) == 7 and test.image_shape == (1, 1, 5)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"x": torch.randn(4, 3)}, "needs tensors x and y"),
        ({"x": torch.randn(4, 3), "y": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "class indices"),
        ({"x": torch.randn(4, 3), "y": torch.tensor([0, 1, -1, 1])}, "labels"),
        ({"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 0])}, "4 images but 3 labels"),
        ({"x": torch.full((4, 3), float("nan")), "y": torch.tensor([0, 1, 0, 1])}, "NaN"),
        ({"x_train": torch.randn(4, 3), "y_train": torch.tensor([0, 1, 0, 1])}, "together"),
    ],
)
def test_bad_tensor_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(MPOCompressError, match=message):
        load_dataset(str(path), "train")


def test_unknown_dataset_and_missing_folder(tmp_path):
    with pytest.raises(MPOCompressError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(MPOCompressError, match=r"--data-dir \(or \$MPOCOMPRESS_DATA\)"):
        load_dataset("fashion-mnist", "test", tmp_path / "nowhere")


# ----------------------------------------------------------------------------- batches and augmentation


def test_crop_flip_moves_whole_windows():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    out = _crop_flip(x, 2, True, g)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # each output image is a flipped or unflipped 8x8 window of the padded input
        windows = [xp[b, :, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)
    again = _crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded: reproducible


def test_two_processes_see_the_global_batches_of_one():
    one = batch_indices(103, 10, True, seed=3, epoch=2)
    r0 = batch_indices(103, 5, True, seed=3, epoch=2, rank=0, world_size=2)
    r1 = batch_indices(103, 5, True, seed=3, epoch=2, rank=1, world_size=2)
    for i in range(10):  # all full global batches agree as sets
        assert set(one[i].tolist()) == set(r0[i].tolist()) | set(r1[i].tolist())
    assert batch_indices(103, 10, True, seed=3, epoch=3)[0].tolist() != one[0].tolist()  # reshuffled per epoch


def test_imageset_batch_normalises_per_channel():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    ds = ImageSet("t", "test", x, torch.tensor([0, 1]), (0.5, 0.25, 1.0), (0.5, 0.25, 2.0))
    xb, yb = ds.batch(torch.tensor([1]))
    assert torch.allclose(xb[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.0])) and yb.tolist() == [1]
