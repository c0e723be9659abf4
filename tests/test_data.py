"""Dataset readers, validation split and loaders (anytime.data).

Synthetic files are written in each official layout and must read back exactly as written.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anytime.data import (
    FASHION_MNIST_CLASSES,
    OFFICIAL_STATS,
    channel_stats,
    default_augmentation,
    eval_preprocess,
    open_dataset,
    restore_split,
    split_train_val,
    val_split_images,
)
from anytime.data.split import split_record_text
from anytime.errors import ConfigError, DatasetError

REAL_FASHION = Path(__file__).parents[1].parent / "shared/data/fashion-mnist.npz"


def _images(rng: np.random.Generator, n: int, h: int, w: int, c: int | None) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------- writers of official layouts


def write_cifar10(root: Path, rng: np.random.Generator, per_batch: int = 6, n_test: int = 7):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    # Python 2 style pickles: byte-string keys, protocol 2, labels as a list, rows of R, G, B planes.
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch}, fh, protocol=2)
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(rng, per_batch, 32, 32, 3)
        y = rng.integers(0, 10, per_batch).tolist()
        data = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        raw = pickle.dumps({b"data": data, b"labels": y, b"batch_label": b"training batch"}, protocol=2)
        if i == 1:  # the distributed files name numpy 1's module path
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / f"data_batch_{i}").write_bytes(raw)
        xs.append(x)
        ys.extend(y)
    test_x = _images(rng, n_test, 32, 32, 3)
    test_y = rng.integers(0, 10, n_test).tolist()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": test_x.transpose(0, 3, 1, 2).reshape(n_test, 3072), b"labels": test_y}, fh)
    return folder, np.concatenate(xs), np.array(ys), test_x, np.array(test_y), names


def write_cifar100(root: Path, rng: np.random.Generator, n_train: int = 20, n_test: int = 5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"fine{i}" for i in range(100)]
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in names],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, fh, protocol=2)  # fmt: skip
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 32, 32, 3)
        y = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), b"fine_labels": y,
                         b"coarse_labels": [v // 5 for v in y]}, fh, protocol=2)  # fmt: skip
        out += [x, np.array(y)]
    return folder, *out, names


def tar_folder(folder: Path, tarball: Path) -> Path:
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return tarball


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(folder: Path, rng: np.random.Generator, gz: bool, n_train: int = 30, n_test: int = 10):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": _images(rng, n_train, 28, 28, None),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": _images(rng, n_test, 28, 28, None),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


def write_folder(root: Path, rng: np.random.Generator, classes: dict[str, int], modes=("L", "RGB"), size=(12, 10)):
    """root/CLASS/i.png with alternating modes; returns {path: (H×W×C array as written, class name)}."""
    written = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mode = modes[i % len(modes)]
            shape = size if mode == "L" else (*size, 3)
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            path = root / name / f"{i:03d}.png"
            Image.fromarray(array, mode).save(path)
            written[str(path)] = (array, name)
    return written


def as_rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array


# ---------------------------------------------------------------- readers


def test_import_does_not_pull_torch():
    code = "import sys, anytime.data as d; d.open_dataset; d.split_train_val; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_real_fashion_mnist_npz():
    if not REAL_FASHION.is_file():
        pytest.skip(f"{REAL_FASHION} not present")
    ds = open_dataset(f"npz:{REAL_FASHION}")
    info = ds.info
    assert (info.kind, info.num_classes, info.channels, info.image_size) == ("npz", 10, 1, (28, 28))
    assert info.classes == list(FASHION_MNIST_CLASSES)
    assert len(ds.train) == 59945 and len(ds.test) == 10000 and ds.val is None
    image, label = ds.train[0]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and 0 <= label < 10
    assert ds.train.labels.dtype == np.int64 and set(np.unique(ds.test.labels)) == set(range(10))
    # Computed from the training split; close to the published Fashion-MNIST statistics.
    assert abs(info.mean[0] - 0.286) < 0.005 and abs(info.std[0] - 0.353) < 0.005
    assert ds.spec.startswith("npz:") and Path(ds.spec[4:]).resolve() == REAL_FASHION.resolve()


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_reads_back_what_was_written(tmp_path, channels):
    rng = np.random.default_rng(1)
    x_train, x_test = _images(rng, 40, 9, 7, channels), _images(rng, 8, 9, 7, channels)
    y_train, y_test = rng.integers(0, 4, 40), rng.integers(0, 4, 8)
    y_train[0] = 3  # make sure the largest label occurs
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = open_dataset(f"npz:{path}")
    expect = x_train[..., None] if channels is None else x_train
    assert ds.info.channels == expect.shape[-1] and ds.info.image_size == (9, 7)
    assert ds.info.classes == ["0", "1", "2", "3"]
    batch, labels = ds.train.get_batch([5, 0, 39])
    np.testing.assert_array_equal(batch, expect[[5, 0, 39]])
    np.testing.assert_array_equal(labels, y_train[[5, 0, 39]])
    np.testing.assert_array_equal(ds.test[7][0], (x_test[..., None] if channels is None else x_test)[7])
    assert ds.test[-1][1] == int(y_test[-1])
    # Statistics are computed exactly from the training split.
    flat = expect.reshape(-1, expect.shape[-1]) / 255.0
    np.testing.assert_allclose(ds.info.mean, flat.mean(0), atol=1e-5)
    np.testing.assert_allclose(ds.info.std, flat.std(0), atol=1e-5)


def test_npz_class_names(tmp_path):
    rng = np.random.default_rng(2)
    arrays = dict(x_train=_images(rng, 20, 4, 4, None), y_train=np.arange(20) % 10,
                  x_test=_images(rng, 5, 4, 4, None), y_test=np.arange(5))  # fmt: skip
    np.savez(tmp_path / "my-fashion-copy.npz", **arrays)
    assert open_dataset(f"npz:{tmp_path / 'my-fashion-copy.npz'}").info.classes == list(FASHION_MNIST_CLASSES)
    np.savez(tmp_path / "digits.npz", **arrays)
    assert open_dataset(f"npz:{tmp_path / 'digits.npz'}").info.classes == [str(i) for i in range(10)]
    names = np.array([f"n{i}" for i in range(12)])
    np.savez(tmp_path / "named.npz", classes=names, **arrays)
    info = open_dataset(f"npz:{tmp_path / 'named.npz'}").info
    assert info.classes == list(names) and info.num_classes == 12
    np.savez(tmp_path / "short.npz", classes=names[:5], **arrays)
    with pytest.raises(DatasetError, match="label 9 but only 5 class names"):
        open_dataset(f"npz:{tmp_path / 'short.npz'}")


def test_bad_specs_and_npz_files_give_clear_errors(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    good = dict(x_train=_images(rng, 4, 5, 5, None), y_train=np.arange(4), x_test=_images(rng, 2, 5, 5, None))
    np.savez(tmp_path / "foo.npz", **good)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        open_dataset("npz:foo.npz")
    assert str(err.value) == (
        f"npz:{tmp_path / 'foo.npz'}: missing array 'y_test'; expected x_train, y_train, x_test, y_test "
        "(uint8 N×H×W or N×H×W×C, integer labels), optional classes (found: x_test, x_train, y_train)"
    )
    with pytest.raises(DatasetError, match="unknown dataset kind 'svhn'.*known kinds: cifar10, cifar100, mnist"):
        open_dataset("svhn:foo")
    with pytest.raises(DatasetError, match="no KIND: prefix \\(did you mean 'npz:foo.npz'\\?\\)"):
        open_dataset("foo.npz")
    with pytest.raises(DatasetError, match="'npz:' has no path after npz:; expected KIND:PATH, e.g. npz:data/"):
        open_dataset("npz:")
    with pytest.raises(DatasetError, match="nope.npz: path does not exist; expected file with x_train"):
        open_dataset("npz:nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="junk.npz: not a readable .npz file"):
        open_dataset("npz:junk.npz")
    # A damaged member of a compressed archive raised zlib.error; a .npy file, a TypeError (not a context manager).
    np.savez_compressed(tmp_path / "packed.npz", **{**good, "y_test": np.arange(2)})
    damaged = bytearray((tmp_path / "packed.npz").read_bytes())
    damaged[60:80] = bytes(b ^ 0x55 for b in damaged[60:80])
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match="damaged.npz: not a readable .npz file"):
        open_dataset("npz:damaged.npz")
    np.save(tmp_path / "single.npy", good["x_train"])
    with pytest.raises(DatasetError, match="single.npy: a single .npy array, not a .npz archive of named arrays"):
        open_dataset("npz:single.npy")
    np.savez(tmp_path / "float.npz", **{**good, "x_train": good["x_train"] / 255.0, "y_test": np.arange(2)})
    with pytest.raises(DatasetError, match="x_train: images have dtype float64; expected uint8"):
        open_dataset("npz:float.npz")
    chw = dict(x_train=_images(rng, 4, 3, 8, 8), y_train=np.arange(4), x_test=_images(rng, 2, 3, 8, 8), y_test=[0, 1])
    np.savez(tmp_path / "chw.npz", **chw)
    with pytest.raises(DatasetError, match="looks channels-first"):
        open_dataset("npz:chw.npz")
    np.savez(tmp_path / "count.npz", **{**good, "y_test": np.arange(3)})
    with pytest.raises(DatasetError, match="y_test: 3 labels for 2 images"):
        open_dataset("npz:count.npz")


def test_home_is_expanded(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "d.npz", x_train=_images(rng, 3, 4, 4, None), y_train=[0, 1, 2],
             x_test=_images(rng, 1, 4, 4, None), y_test=[1])  # fmt: skip
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = open_dataset("NPZ:~/d.npz")
    assert ds.spec == f"npz:{tmp_path / 'd.npz'}" and ds.info.path == str(tmp_path / "d.npz")


@pytest.mark.parametrize("layout", ["folder", "parent", "tarball", "parent-with-tarball"])
def test_cifar10_layouts(tmp_path, layout):
    folder, x, y, tx, ty, names = write_cifar10(tmp_path / "src", np.random.default_rng(5))
    if layout == "folder":
        target = folder
    elif layout == "parent":
        target = folder.parent
    else:
        (tmp_path / "dl").mkdir()
        target = tar_folder(folder, tmp_path / "dl" / "cifar-10-python.tar.gz")
        if layout == "parent-with-tarball":
            target = target.parent
    ds = open_dataset(f"cifar10:{target}")
    assert ds.info.classes == names and ds.info.image_size == (32, 32) and ds.info.channels == 3
    assert (ds.info.mean, ds.info.std) == OFFICIAL_STATS["cifar10"]
    np.testing.assert_array_equal(ds.train.get_batch(np.arange(30))[0], x)
    np.testing.assert_array_equal(ds.train.labels, y)
    np.testing.assert_array_equal(ds.test.get_batch(np.arange(7))[0], tx)
    np.testing.assert_array_equal(ds.test.labels, ty)
    assert ds.val is None


@pytest.mark.parametrize("as_tarball", [False, True])
def test_cifar100(tmp_path, as_tarball):
    folder, x, y, tx, ty, names = write_cifar100(tmp_path, np.random.default_rng(6))
    target = tar_folder(folder, tmp_path / "cifar-100-python.tar.gz") if as_tarball else folder
    ds = open_dataset(f"cifar100:{target}")
    assert ds.info.num_classes == 100 and ds.info.classes == names
    np.testing.assert_array_equal(ds.train.get_batch(range(20))[0], x)
    np.testing.assert_array_equal(ds.train.labels, y)  # fine labels, not coarse
    np.testing.assert_array_equal(ds.test.get_batch(range(5))[0], tx)
    np.testing.assert_array_equal(ds.test.labels, ty)


def test_cifar_errors(tmp_path):
    folder, *_ = write_cifar10(tmp_path, np.random.default_rng(7))
    (folder / "data_batch_3").unlink()
    expected = "data_batch_3: file not found; expected cifar-10-batches-py/ with batches.meta"
    with pytest.raises(DatasetError, match=expected):
        open_dataset(f"cifar10:{folder}")
    # A pickle that would run code when loaded is refused.
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load posix.getcwd"):
        open_dataset(f"cifar10:{folder}")
    with pytest.raises(DatasetError, match="no CIFAR files found"):
        open_dataset(f"cifar100:{tmp_path}")


@pytest.mark.parametrize("compression", ["gz", ""])
def test_truncated_cifar_archive_is_a_clear_error(tmp_path, compression):
    # A download cut short: gzip raised EOFError from deep inside tarfile, which the CLI reported as "Aborted.".
    folder, *_ = write_cifar10(tmp_path / "src", np.random.default_rng(7))
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, f"w:{compression}") as tar:
        tar.add(folder, arcname=folder.name)
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz: damaged or truncated archive .*download it again"):
        open_dataset(f"cifar10:{tarball}")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", np.random.default_rng(8), gz)
    for kind, classes in (("mnist", [str(i) for i in range(10)]), ("fashion-mnist", list(FASHION_MNIST_CLASSES))):
        ds = open_dataset(f"{kind}:{tmp_path / 'mnist'}")
        assert ds.info.classes == classes and ds.info.channels == 1 and ds.info.image_size == (28, 28)
        assert (ds.info.mean, ds.info.std) == OFFICIAL_STATS[kind]
        np.testing.assert_array_equal(ds.train.get_batch(range(30))[0][..., 0], arrays["train-images-idx3-ubyte"])
        np.testing.assert_array_equal(ds.train.labels, arrays["train-labels-idx1-ubyte"])
        np.testing.assert_array_equal(ds.test.get_batch(range(10))[0][..., 0], arrays["t10k-images-idx3-ubyte"])
        np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])


def test_mnist_files_are_read_by_content_not_by_name(tmp_path):
    import gzip

    write_mnist(tmp_path, np.random.default_rng(9), gz=False)
    expected = open_dataset(f"mnist:{tmp_path}")
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(gzip.compress(images.read_bytes()))  # gzipped, under the raw name
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.rename(tmp_path / "train-labels-idx1-ubyte.gz")  # raw, under the .gz name
    ds = open_dataset(f"mnist:{tmp_path}")
    np.testing.assert_array_equal(ds.train.images, expected.train.images)
    np.testing.assert_array_equal(ds.train.labels, expected.train.labels)
    header = bytes([0, 0, 8, 1]) + (2**31 - 1).to_bytes(4, "big")  # a damaged count: no overflow, one line
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(header + b"\0" * 10)
    with pytest.raises(DatasetError, match=r"holds 10 bytes of data; the header \(2147483647,\) says 2147483647"):
        open_dataset(f"mnist:{tmp_path}")


def test_mnist_errors(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(9), gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    expected = "t10k-labels-idx1-ubyte: holds 9 bytes of data; the header \\(10,\\) says 10"
    with pytest.raises(DatasetError, match=expected):
        open_dataset(f"mnist:{tmp_path}")
    path.unlink()
    with pytest.raises(DatasetError, match="missing t10k-labels-idx1-ubyte\\[.gz\\]; expected a directory with"):
        open_dataset(f"mnist:{tmp_path}")
    # Test images of another size than the training images (files of two datasets mixed) were accepted.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(10), gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32)), gz=False)
    with pytest.raises(
        DatasetError, match="t10k-images-idx3-ubyte: images are 32×32 but train-images-idx3-ubyte holds 28×28"
    ):
        open_dataset(f"mnist:{tmp_path}")


def test_imagefolder_with_splits(tmp_path):
    rng = np.random.default_rng(10)
    train = write_folder(tmp_path / "train", rng, {"cat": 3, "dog": 4, "emu": 2})
    val = write_folder(tmp_path / "val", rng, {"dog": 2, "cat": 1})
    test = write_folder(tmp_path / "test", rng, {"emu": 2})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = open_dataset(f"imagefolder:{tmp_path}")
    info = ds.info
    assert info.classes == ["cat", "dog", "emu"] and info.channels == 3 and info.image_size == (12, 10)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 2)
    for split, written in ((ds.train, train), (ds.val, val), (ds.test, test)):
        for i, path in enumerate(split.paths):
            array, name = written[path]
            image, label = split[i]
            np.testing.assert_array_equal(image, as_rgb(array))  # grey images replicated to RGB
            assert info.classes[label] == name
    assert set(train) == set(ds.train.paths)
    # Statistics estimated from the (here complete) sample match the exact ones.
    pixels = np.concatenate([as_rgb(a).reshape(-1, 3) for a, _ in train.values()]) / 255.0
    np.testing.assert_allclose(info.mean, pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(info.std, pixels.std(0), atol=1e-5)


def test_imagefolder_without_splits_grey_and_variable_size(tmp_path):
    rng = np.random.default_rng(11)
    written = write_folder(tmp_path, rng, {"a": 2}, modes=("L",), size=(8, 8))
    written |= write_folder(tmp_path, rng, {"b": 2}, modes=("L",), size=(6, 9))
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert ds.val is None and ds.test is None and len(ds.train) == 4
    assert ds.info.channels == 1 and ds.info.image_size is None
    for i, path in enumerate(ds.train.paths):
        np.testing.assert_array_equal(ds.train[i][0][..., 0], written[path][0])
    with pytest.raises(DatasetError, match="cannot stack images of different sizes"):
        ds.train.get_batch([0, 3])


def test_imagefolder_reads_each_directory_once_through_symlinks(tmp_path):
    # A link back up the tree listed a's image again at every depth (a/again/again/...): 41 copies, one label.
    # (Two such links made it 2**40 directories: the folder never opened.)
    rng = np.random.default_rng(30)
    root = tmp_path / "data"
    write_folder(root, rng, {"a": 2, "b": 1})
    (root / "a" / "again").symlink_to(".", target_is_directory=True)
    write_folder(tmp_path / "elsewhere", rng, {"more": 1})
    (root / "b" / "more").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)  # still followed
    ds = open_dataset(f"imagefolder:{root}")
    assert [os.path.relpath(p, root) for p in ds.train.paths] == [
        "a/000.png",
        "a/001.png",
        "b/000.png",
        "b/more/000.png",
    ]
    assert list(ds.train.labels) == [0, 0, 1, 1]


def test_imagefolder_skips_hidden_directories_inside_class_folders(tmp_path):
    # Hidden files and hidden class folders were skipped, but a/.thumbnails/ inside a class folder was read.
    rng = np.random.default_rng(31)
    write_folder(tmp_path, rng, {"a": 1, "b": 1, "a/sub": 1, "a/.thumbnails": 2, ".hidden": 1})
    (tmp_path / "b" / ".cover.png").write_bytes((tmp_path / "b" / "000.png").read_bytes())
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert ds.info.classes == ["a", "b"]
    assert [os.path.relpath(p, tmp_path) for p in ds.train.paths] == ["a/000.png", "a/sub/000.png", "b/000.png"]


def test_imagefolder_image_size_is_that_of_the_images_as_decoded(tmp_path):
    # Photos stored 30×40 with "rotate 90°" in EXIF decode as 40×30, but image_size said (30, 40): a model
    # built at that size scaled every upright photo to 53×40 and cropped away 43% of its rows.
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
        exif = image.getexif()
        exif[0x0112] = 6
        image.save(tmp_path / name / "photo.jpg", exif=exif)
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert ds.train[0][0].shape == (40, 30, 3)
    assert ds.info.image_size == (40, 30)


def test_imagefolder_split_folders_in_any_case(tmp_path):
    # Train/ and Test/ were read as two classes named "Test" and "Train", labelling every image by its split.
    rng = np.random.default_rng(32)
    write_folder(tmp_path / "Train", rng, {"cat": 2, "dog": 1})
    write_folder(tmp_path / "Test", rng, {"dog": 1})
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert ds.info.classes == ["cat", "dog"] and (len(ds.train), len(ds.test)) == (3, 1)
    assert list(ds.train.labels) == [0, 0, 1] and list(ds.test.labels) == [1]


def test_imagefolder_class_names_compose_and_loose_images_are_named(tmp_path, caplog):
    import unicodedata

    from anytime.runtime.inputs import ClassFolders

    rng = np.random.default_rng(33)
    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    write_folder(tmp_path / "train", rng, {decomposed: 2, "tea": 1})  # as copied from macOS
    write_folder(tmp_path / "val", rng, {composed: 1})
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "train" / "stray.png")
    with caplog.at_level("WARNING"):
        ds = open_dataset(f"imagefolder:{tmp_path}")
    assert ds.info.classes == [composed, "tea"] and list(ds.val.labels) == [0]
    assert "1 image file(s) lie directly in" in caplog.text and "not used" in caplog.text
    folders = ClassFolders([composed, "tea"])
    assert folders.index(decomposed) == 0 and folders.index("Cafe") == 0
    write_folder(tmp_path / "validation", rng, {"tea": 1})  # a second validation split: which one?
    with pytest.raises(DatasetError, match="val/ and validation/ are both val splits; keep one"):
        open_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_errors(tmp_path):
    rng = np.random.default_rng(12)
    write_folder(tmp_path / "train", rng, {"a": 1})
    write_folder(tmp_path / "val", rng, {"zebra": 1})
    with pytest.raises(DatasetError, match="classes \\['zebra'\\] have no folder in"):
        open_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-directories"):
        open_dataset(f"imagefolder:{tmp_path / 'empty'}")
    broken = tmp_path / "broken"
    write_folder(broken, rng, {"a": 1})
    (broken / "a" / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="bad.png: cannot read image header"):
        open_dataset(f"imagefolder:{broken}")


# ---------------------------------------------------------------- validation split


@pytest.fixture
def small_npz(tmp_path) -> str:
    rng = np.random.default_rng(13)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=_images(rng, 200, 6, 6, None), y_train=rng.integers(0, 5, 200),
             x_test=_images(rng, 20, 6, 6, None), y_test=rng.integers(0, 5, 20))  # fmt: skip
    return f"npz:{path}"


def test_split_is_deterministic_disjoint_and_restorable(small_npz, tmp_path):
    ds = open_dataset(small_npz)
    train, val, record = split_train_val(ds, seed=3)
    assert len(val) == 20 and len(train) == 180  # 10% by default
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).size == 200
    train2, val2, _ = split_train_val(ds, seed=3)
    np.testing.assert_array_equal(val, val2)
    np.testing.assert_array_equal(train, train2)
    assert not np.array_equal(val, split_train_val(ds, seed=4)[1])
    assert len(split_train_val(ds, val_size=0.25)[1]) == 50 and len(split_train_val(ds, val_size=7)[1]) == 7
    assert len(split_train_val(ds, val_size=0)[1]) == 0

    # record -> split.json -> restore, on a freshly opened dataset
    (tmp_path / "split.json").write_text(split_record_text(record))
    loaded = json.loads((tmp_path / "split.json").read_text())
    assert loaded["source"] == "holdout" and loaded["dataset"] == ds.spec and loaded["val_count"] == 20
    r_train, r_val = restore_split(open_dataset(small_npz), loaded)
    np.testing.assert_array_equal(r_train, train)
    np.testing.assert_array_equal(r_val, val)
    images = val_split_images(ds, loaded)
    assert len(images) == 20
    np.testing.assert_array_equal(images.get_batch([0, 19])[0], ds.train.get_batch(val[[0, 19]])[0])
    assert images[3][1] == int(ds.train.labels[val[3]])

    # version 1 records (every index listed) from earlier runs still restore to the same split
    old = {k: v for k, v in record.items() if not k.endswith("_ranges")}
    old.update(format_version=1, train_indices=train.tolist(), val_indices=val.tolist())
    v1_train, v1_val = restore_split(ds, json.loads(json.dumps(old)))
    np.testing.assert_array_equal(v1_train, train)
    np.testing.assert_array_equal(v1_val, val)


def test_split_ranges_round_trip_and_malformed_ranges_are_refused(small_npz):
    from anytime.data.split import index_ranges, ranges_indices

    assert index_ranges(np.array([0, 1, 2, 5, 7, 8])) == [[0, 3], [5, 6], [7, 9]]
    assert index_ranges(np.array([], dtype=np.int64)) == [] and ranges_indices([], "val_ranges").size == 0
    rng = np.random.default_rng(3)
    for _ in range(20):
        idx = np.unique(rng.integers(0, 500, rng.integers(1, 300)))
        np.testing.assert_array_equal(ranges_indices(index_ranges(idx), "x"), idx)

    ds = open_dataset(small_npz)
    _, _, record = split_train_val(ds, seed=1)
    # a hold-out's training split is the complement of 20 images: at most 21 runs instead of 180 indices
    assert len(record["train_ranges"]) <= 21
    for bad, problem in (([[5, 3]], "not increasing"), ([[0, 4], [2, 6]], "not increasing"), ([[1, 2, 3]], "pairs")):
        with pytest.raises(DatasetError, match=problem):
            restore_split(ds, {**record, "val_ranges": bad})
    with pytest.raises(DatasetError, match="format_version 3 is not supported .* reads 1, 2"):
        restore_split(ds, {**record, "format_version": 3})


def test_split_defaults_and_bad_sizes(small_npz):
    from anytime.data.split import resolve_val_size

    assert resolve_val_size(None, 50000, "cifar10") == 5000 and resolve_val_size(None, 50000, "cifar100") == 5000
    assert resolve_val_size(None, 59945, "npz") == 5994
    ds = open_dataset(small_npz)
    for bad in (200, -1, 1.5, "10", True):
        with pytest.raises(ConfigError, match="val_size"):
            split_train_val(ds, val_size=bad)


def test_restore_detects_a_changed_dataset(small_npz, tmp_path):
    ds = open_dataset(small_npz)
    _, _, record = split_train_val(ds)
    rng = np.random.default_rng(14)
    bigger = tmp_path / "bigger.npz"
    np.savez(bigger, x_train=_images(rng, 201, 6, 6, None), y_train=rng.integers(0, 5, 201),
             x_test=_images(rng, 2, 6, 6, None), y_test=[0, 1])  # fmt: skip
    expected = "with 200 training images, but npz:.*bigger.npz has 201; the dataset changed"
    with pytest.raises(DatasetError, match=expected):
        restore_split(open_dataset(f"npz:{bigger}"), record)
    relabelled = tmp_path / "relabelled.npz"
    np.savez(relabelled, x_train=ds.train.get_batch(range(200))[0], y_train=(ds.train.labels + 1) % 5,
             x_test=_images(rng, 2, 6, 6, None), y_test=[0, 1])  # fmt: skip
    with pytest.raises(DatasetError, match="training labels of .* differ"):
        restore_split(open_dataset(f"npz:{relabelled}"), record)
    with pytest.raises(DatasetError, match="not a validation split record"):
        restore_split(ds, {"train_indices": []})


def test_split_uses_the_sources_own_validation_folder(tmp_path):
    rng = np.random.default_rng(15)
    write_folder(tmp_path / "train", rng, {"a": 3, "b": 3})
    write_folder(tmp_path / "val", rng, {"a": 1, "b": 2})
    ds = open_dataset(f"imagefolder:{tmp_path}")
    train, val, record = split_train_val(ds, val_size=0.5)
    assert record["source"] == "dataset-val" and len(train) == 6 and len(val) == 3
    images = val_split_images(ds, record)
    assert list(images.labels) == [0, 1, 1]
    np.testing.assert_array_equal(images[2][0], ds.val[2][0])
    np.testing.assert_array_equal(restore_split(ds, json.loads(json.dumps(record)))[1], val)


# ---------------------------------------------------------------- loaders (torch)


def _loader(split, indices=None, **kw):
    from anytime.data import make_loader

    args = dict(batch_size=16, train=True, mean=(0.5,), std=(0.25,), image_size=6, channels=1)
    return make_loader(split, indices, **{**args, **kw})


def _batches(loader):
    return [(x.numpy().copy(), y.numpy().copy()) for x, y in loader]


def test_loader_is_deterministic_per_seed_and_epoch(small_npz):
    ds = open_dataset(small_npz)
    train, _, _ = split_train_val(ds)
    a = _batches(_loader(ds.train, train, seed=1, epoch=2))
    b = _batches(_loader(ds.train, train, seed=1, epoch=2))
    assert len(a) == len(_loader(ds.train, train)) == 12  # ceil(180 / 16)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert a[0][0].shape == (16, 1, 6, 6) and a[0][0].dtype == np.float32 and a[0][1].dtype == np.int64
    other = _loader(ds.train, train, seed=1, epoch=0)
    other.set_epoch(3)
    c = _batches(other)
    assert not np.array_equal(a[0][1], c[0][1])
    # Every training image once per epoch, none of the hold-out.
    labels = np.concatenate([y for _, y in a])
    assert len(labels) == 180
    assert sorted(np.concatenate(_loader(ds.train, train, seed=1, epoch=2).batch_indices())) == sorted(train)


def test_augmentation_only_when_training(small_npz):
    ds = open_dataset(small_npz)
    images, labels = ds.train.get_batch(np.arange(200))
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    evaluated = np.concatenate([x for x, _ in _batches(_loader(ds.train, train=False))])
    np.testing.assert_allclose(evaluated, expected, atol=1e-5)  # in order, unaugmented
    plain = _loader(ds.train, train=True, pad=0, flip=False, seed=5)
    order = np.concatenate(plain.batch_indices())
    np.testing.assert_allclose(np.concatenate([x for x, _ in _batches(plain)]), expected[order], atol=1e-5)
    augmented = np.concatenate([x for x, _ in _batches(_loader(ds.train, seed=5))])
    assert not np.allclose(augmented, expected[order], atol=1e-3)


def test_each_augmented_image_is_a_padded_crop_or_its_mirror(small_npz):
    ds = open_dataset(small_npz)
    loader = _loader(ds.train, np.arange(40), pad=2, mean=(0.0,), std=(1.0,), seed=9)
    images, _ = ds.train.get_batch(np.arange(40))
    order = np.concatenate(loader.batch_indices())
    got = np.rint(np.concatenate([x for x, _ in _batches(loader)])[:, 0] * 255).astype(np.uint8)
    flipped = 0
    for out, i in zip(got, order):
        padded = np.pad(images[i, :, :, 0], 2)
        candidates = [padded[t : t + 6, s : s + 6] for t in range(5) for s in range(5)]
        if any(np.array_equal(out, c) for c in candidates):
            continue
        assert any(np.array_equal(out, c[:, ::-1]) for c in candidates)
        flipped += 1
    assert 5 < flipped < 35


def test_distributed_shards_are_disjoint_equal_and_covering(small_npz):
    ds = open_dataset(small_npz)
    indices = np.arange(0, 200, 2)[:99]  # 99 images over 4 ranks: padded to 100

    def shard(rank: int, **kw) -> np.ndarray:
        return np.concatenate(_loader(ds.train, indices, rank=rank, world_size=4, **kw).batch_indices())

    shards = [shard(r, seed=2) for r in range(4)]
    assert [len(s) for s in shards] == [25] * 4
    assert set(np.concatenate(shards)) == set(indices)
    positions = [np.concatenate([np.flatnonzero(indices == v) for v in s]) for s in shards]
    assert len(np.unique(np.concatenate(positions))) == 99  # only the one padding repeat is shared
    assert len(_loader(ds.train, indices, rank=1, world_size=4, batch_size=8)) == 4
    # Evaluation shards: original order, no padding, every image exactly once.
    evals = [shard(r, train=False) for r in range(4)]
    assert sorted(np.concatenate(evals)) == sorted(indices)
    with pytest.raises(ConfigError, match="rank=4 is out of range"):
        _loader(ds.train, indices, rank=4, world_size=4)


def test_channel_conversion_and_resize(tmp_path):
    rng = np.random.default_rng(16)
    rgb = _images(rng, 5, 8, 8, 3)
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=rgb, y_train=np.arange(5), x_test=rgb[:1], y_test=[0])
    ds = open_dataset(f"npz:{path}")
    grey = _batches(_loader(ds.train, train=False, image_size=8, mean=(0,), std=(1,), batch_size=5))[0][0]
    pil_luma = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    np.testing.assert_array_equal(np.rint(grey[:, 0] * 255).astype(np.uint8), pil_luma)
    # Grey to RGB replicates; 1-value mean/std broadcast per channel.
    np.savez(path, x_train=rgb[..., 0], y_train=np.arange(5), x_test=rgb[:1, ..., 0], y_test=[0])
    grey_ds = open_dataset(f"npz:{path}")
    x = _batches(_loader(grey_ds.train, train=False, image_size=8, channels=3, mean=(0,), std=(1,), batch_size=5))[0][0]
    assert x.shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(x[:, 0], x[:, 2])
    # Resize + centre crop matches the torch-free reference preprocessing.
    loader = _loader(grey_ds.train, train=False, image_size=(6, 6), resize=7, mean=(0,), std=(1,), batch_size=5)
    x = _batches(loader)[0][0]
    ref = np.stack([eval_preprocess(im[..., None], 1, (6, 6), resize=7) for im in rgb[..., 0]])
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), ref.transpose(0, 3, 1, 2))
    with pytest.raises(ConfigError, match="mean/std have 2 values for a model with 1 input channels"):
        _loader(ds.train, mean=(0.1, 0.2), std=(1, 1))


def test_imagefolder_loader(tmp_path):
    rng = np.random.default_rng(17)
    write_folder(tmp_path / "train", rng, {"a": 5, "b": 4}, size=(12, 10))
    ds = open_dataset(f"imagefolder:{tmp_path}")
    kw = dict(image_size=8, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), batch_size=4)
    loader = _loader(ds.train, **kw, train=False)
    assert len(loader) == 3
    x, y = next(iter(loader))
    ref = np.stack([eval_preprocess(ds.train[i][0], 3, (8, 8)) for i in range(4)])  # shorter side 10 -> 8, centre crop
    np.testing.assert_allclose(x.numpy(), (ref.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), ds.train.labels[:4])
    # Training batches depend on (seed, epoch), not on the number of workers.
    a = _batches(_loader(ds.train, **kw, seed=3, epoch=1, num_workers=0))
    b = _batches(_loader(ds.train, **kw, seed=3, epoch=1, num_workers=2))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    c = _batches(_loader(ds.train, **kw, seed=3, epoch=2))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))


def test_defaults_for_models():
    from anytime.data import DatasetInfo

    fm = DatasetInfo("fashion-mnist", "/x", 10, list(FASHION_MNIST_CLASSES), 1, (28, 28), (0.286,), (0.353,))
    digits = DatasetInfo("mnist", "/x", 10, [str(i) for i in range(10)], 1, (28, 28), (0.1307,), (0.3081,))
    folder = DatasetInfo("imagefolder", "/x", 2, ["a", "b"], 3, None, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert default_augmentation(fm) == {"pad": 4, "flip": True}
    assert default_augmentation(digits) == {"pad": 4, "flip": False}
    assert default_augmentation(folder) == {"pad": 0, "flip": True}
    assert channel_stats(fm, 3) == ((0.286,) * 3, (0.353,) * 3)
    mean, std = channel_stats(folder, 1)
    assert mean == (round(0.299 * 0.5 + 0.587 * 0.4 + 0.114 * 0.3, 6),) and std == (0.2,)
