"""Tests for resnet_jax.data: the three ways of loading, file validation, and device helpers."""

import dataclasses
import gzip
import io
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import data
from resnet_jax.errors import UserError

SPEC = data.DATASETS["fashion_mnist"]
# (split, images file, labels file) as the originals are named.
(_, TRAIN_IMAGES, TRAIN_LABELS), (_, TEST_IMAGES, TEST_LABELS) = SPEC.idx_files

# ----- synthetic IDX files ---------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: magic, big-endian uint32 dims, then the uint8 data."""
    dims = np.asarray(array.shape, ">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + np.asarray(array, np.uint8).tobytes()


def write_gz(path: Path, payload: bytes, *, debian: bool = False) -> None:
    """Gzips like upstream (FNAME + 2017 mtime) or like Debian (no FNAME, build-time mtime)."""
    name = "" if debian else path.name.removesuffix(".gz")
    mtime = 1591347900 if debian else 1504176606
    with open(path, "wb") as raw, gzip.GzipFile(name, "wb", 9, raw, mtime) as g:
        g.write(payload)


def make_idx_dir(
    folder: Path,
    *,
    n_train: int = 12,
    n_test: int = 5,
    debian: bool = False,
    compressed: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Writes a tiny four-file IDX set; returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: np.arange(n_train, dtype=np.uint8) % 10,
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LABELS: (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        payload = idx_bytes(array, 0x803 if array.ndim == 3 else 0x801)
        if compressed:
            write_gz(folder / name, payload, debian=debian)
        else:
            (folder / name.removesuffix(".gz")).write_bytes(payload)
    return arrays


def assert_matches(ds: data.Dataset, arrays: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(ds.train_labels, arrays[TRAIN_LABELS])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays[TEST_IMAGES])
    np.testing.assert_array_equal(ds.test_labels, arrays[TEST_LABELS])
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    err = excinfo.value
    assert isinstance(err, data.DataError) and isinstance(err, UserError)
    message = str(err)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ----- raw IDX files (way 3), real data ----------------------------------------------------------


@pytest.fixture(scope="module")
def real(fashion_mnist_dir: Path) -> data.Dataset:
    # Loaded once for the module: each load decompresses 30 MB.
    return data.load_dataset("fashion_mnist", fashion_mnist_dir)


def test_real_fashion_mnist_from_idx(real: data.Dataset, fashion_mnist_dir: Path):
    assert real.source == f"raw IDX files in {fashion_mnist_dir}"
    assert real.spec is SPEC
    assert real.train_images.shape == (60_000, 28, 28, 1)
    assert real.test_images.shape == (10_000, 28, 28, 1)
    assert real.train_images.dtype == real.test_images.dtype == np.uint8
    assert real.train_labels.dtype == real.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(real.train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(real.test_labels, minlength=10), [1000] * 10)
    assert real.train_labels[0] == 9  # The ankle boot of every Fashion-MNIST tutorial.
    assert real.train_images.max() == 255 and real.train_images.min() == 0


def test_fashion_mnist_files_under_another_name_or_split_are_refused(fashion_mnist_dir: Path,
                                                                    tmp_path: Path):
    # MNIST's and KMNIST's files have the same names: a wrong folder would train silently.
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("mnist", fashion_mnist_dir)
    assert_one_line_error(excinfo, "holds Fashion-MNIST's train labels, not mnist's")
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        for name, other in (("train", "t10k"), ("t10k", "train")):
            target = fashion_mnist_dir / f"{other}-{kind}-ubyte.gz"
            (swapped / f"{name}-{kind}-ubyte.gz").symlink_to(target)
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("fashion_mnist", swapped)
    assert_one_line_error(excinfo, "Fashion-MNIST's test labels where its train labels belong")


def test_full_sized_labels_that_are_not_fashion_mnists_are_named_in_a_warning(
        real: data.Dataset, fashion_mnist_dir: Path, tmp_path: Path):
    # MNIST's files (not on this machine) have Fashion-MNIST's names and sizes; full-sized labels
    # that are not Fashion-MNIST's stand in for them. Tiny made-up sets load without a word.
    other = tmp_path / "other"
    other.mkdir()
    for name in (TRAIN_IMAGES, TEST_IMAGES, TEST_LABELS):
        (other / name).symlink_to(fashion_mnist_dir / name)
    write_gz(other / TRAIN_LABELS, idx_bytes(np.roll(real.train_labels, 1), 0x801))
    with pytest.warns(UserWarning, match="is not Fashion-MNIST's published train labels"):
        data.load_dataset("fashion_mnist", other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_idx_dir(tmp_path / "tiny")
        data.load_dataset("fashion_mnist", tmp_path / "tiny")


# ----- TFDS manual dir (way 2) ------------------------------------------------------------------


def test_manual_dir_without_tensorflow_reads_idx(
    real: data.Dataset, fashion_mnist_dir: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in SPEC.idx_file_names:
        (manual / name).symlink_to(fashion_mnist_dir / name)
    ds = data.load_dataset("fashion_mnist", tmp_path)
    assert ds.source.startswith(f"raw IDX files in TFDS manual dir {manual}")
    assert "TensorFlow not installed" in ds.source
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(ds, field), getattr(real, field))


def test_manual_dir_with_tensorflow_hides_gpus_first_then_falls_back(tmp_path: Path, monkeypatch):
    # TensorFlow is not installed here, so a stand-in records what would be asked of it and
    # of TFDS; TFDS's preparation then fails (as with Debian's re-gzipped copies, whose
    # checksums TFDS rejects) and the IDX files are read directly instead.
    import tensorflow_datasets as tfds  # Before the stand-in: TFDS probes sys.modules on import.

    calls = []
    fake_tf = types.ModuleType("tensorflow")
    fake_tf.config = types.SimpleNamespace(
        set_visible_devices=lambda devices, kind: calls.append(("hide", devices, kind)),
        get_visible_devices=lambda kind: [],
    )
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)

    class FakeBuilder:
        def download_and_prepare(self, download_config):
            calls.append(("prepare", download_config.manual_dir, download_config.try_download_gcs))
            raise RuntimeError("checksums\ndo not match")

    def fake_builder(name, data_dir, file_format):
        calls.append(("builder", name, data_dir, file_format))
        return FakeBuilder()

    monkeypatch.setattr(tfds, "builder", fake_builder)
    manual = tmp_path / "downloads" / "manual"
    arrays = make_idx_dir(manual, debian=True)

    ds = data.load_dataset("fashion_mnist", tmp_path)
    assert calls == [
        ("hide", [], "GPU"),
        ("builder", "fashion_mnist", str(tmp_path), "array_record"),
        ("prepare", str(manual), False),
    ]
    assert "TFDS preparation failed with RuntimeError" in ds.source
    assert_matches(ds, arrays)


# ----- prepared TFDS data dir (way 1) -----------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_tfds(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A real, tiny, prepared array_record `fashion_mnist` written by TFDS without TensorFlow.

    TFDS's own FashionMNIST builder reads the IDX files with tf.io.gfile and encodes PNGs with
    TensorFlow, and `tfds.testing.mock_data` does not mock `data_source` batch reads, so we
    write the same features with an unregistered builder that yields PNG bytes made by PIL.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    splits = {}
    for split, n in (("train", 20), ("test", 7)):
        images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(n)  # An id: TFDS shuffles the examples when writing.
        splits[split] = (images, (np.arange(n) * 7 % 10).astype(np.int32))

    class TinyFashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "fashion_mnist"
        VERSION = tfds.builder_cls("fashion_mnist").VERSION

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(SPEC.class_names)),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            images, labels = splits[split]
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                png = io.BytesIO()
                pil.fromarray(image[..., 0]).save(png, format="PNG")
                yield i, {"image": png.getvalue(), "label": int(label)}

    root = tmp_path_factory.mktemp("tfds")
    TinyFashionMnist(data_dir=str(root), file_format="array_record").download_and_prepare()
    return root, splits


def _by_id(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(images[:, 0, 0, 0])
    return images[order], labels[order]


def test_prepared_tfds_dir(prepared_tfds):
    root, splits = prepared_tfds
    ds = data.load_dataset("fashion_mnist", root)
    assert ds.source == f"prepared TFDS dataset in {root}"
    for split in ("train", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        got_images, got_labels = _by_id(images, labels)
        np.testing.assert_array_equal(got_images, splits[split][0])
        np.testing.assert_array_equal(got_labels, splits[split][1])


def test_default_places_tfds_data_dir(prepared_tfds, monkeypatch):
    root, splits = prepared_tfds
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))
    ds = data.load_dataset("fashion_mnist", None)
    assert ds.source == f"prepared TFDS dataset in {root}"
    assert len(ds.train_labels) == len(splits["train"][1])


def test_default_places_system_dir(tmp_path: Path, monkeypatch):
    system = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    arrays = make_idx_dir(system, debian=True)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds_here"))
    patched = dataclasses.replace(SPEC, system_dirs=(str(system),))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", patched)
    ds = data.load_dataset("fashion_mnist", None)
    assert ds.source == f"raw IDX files in {system}"
    assert_matches(ds, arrays)


def test_default_places_nothing_found(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", dataclasses.replace(SPEC, system_dirs=()))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", None)
    assert_one_line_error(excinfo, "usual places", str(tmp_path / "empty"), TRAIN_IMAGES)


# ----- IDX variants -----------------------------------------------------------------------------


def test_debian_gzip_header_accepted(tmp_path: Path):
    upstream = make_idx_dir(tmp_path / "upstream", debian=False)
    debian = make_idx_dir(tmp_path / "debian", debian=True)
    # Same data, different gzip headers (Debian drops the file name and changes the mtime).
    a = (tmp_path / "upstream" / TRAIN_LABELS).read_bytes()
    b = (tmp_path / "debian" / TRAIN_LABELS).read_bytes()
    assert a[3] & 0x08 and not b[3] & 0x08 and a != b  # FNAME flag
    assert gzip.decompress(a) == gzip.decompress(b)
    assert_matches(data.load_dataset("fashion_mnist", tmp_path / "debian"), debian)
    assert_matches(data.load_dataset("fashion_mnist", tmp_path / "upstream"), upstream)


def test_uncompressed_idx_accepted(tmp_path: Path):
    arrays = make_idx_dir(tmp_path, compressed=False)
    assert not list(tmp_path.glob("*.gz"))
    assert_matches(data.load_dataset("fashion_mnist", tmp_path), arrays)


# ----- bad input: one-line DataError --------------------------------------------------------------


def test_unknown_dataset_name():
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("imagenet", None)
    assert_one_line_error(excinfo, "imagenet", "cifar10, fashion_mnist, kmnist, mnist")


def test_missing_folder(tmp_path: Path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path / "nope")
    assert_one_line_error(excinfo, "does not exist", str(tmp_path / "nope"))


def test_empty_folder_names_the_three_ways(tmp_path: Path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(
        excinfo, "no usable", "prepared TFDS", "downloads/manual", *SPEC.idx_file_names
    )


def test_partial_folder_says_what_lacks(tmp_path: Path):
    make_idx_dir(tmp_path)
    (tmp_path / TEST_LABELS).unlink()
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, f"lacks {TEST_LABELS}")


def test_wrong_magic(tmp_path: Path):
    arrays = make_idx_dir(tmp_path)
    # An images file written with the labels' magic number.
    write_gz(tmp_path / TRAIN_IMAGES, idx_bytes(arrays[TRAIN_IMAGES], 0x801))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, TRAIN_IMAGES, "magic number 0x00000801", "0x00000803")


def test_truncated_gzip(tmp_path: Path, fashion_mnist_dir: Path):
    make_idx_dir(tmp_path)
    whole = (fashion_mnist_dir / TRAIN_LABELS).read_bytes()
    (tmp_path / TRAIN_LABELS).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, TRAIN_LABELS, "truncated gzip")


def test_corrupt_gzip_crc(tmp_path: Path):
    make_idx_dir(tmp_path)
    path = tmp_path / TEST_IMAGES
    blob = bytearray(path.read_bytes())
    blob[-8] ^= 0xFF  # The CRC32 in the gzip trailer.
    path.write_bytes(bytes(blob))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, TEST_IMAGES, "corrupt gzip")


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("delta", [-1, +1])
def test_header_inconsistent_with_size(tmp_path: Path, compressed: bool, delta: int):
    arrays = make_idx_dir(tmp_path, compressed=compressed)
    payload = idx_bytes(arrays[TEST_IMAGES], 0x803)
    payload = payload[:delta] if delta < 0 else payload + b"\0" * delta
    name = TEST_IMAGES if compressed else TEST_IMAGES.removesuffix(".gz")
    if compressed:
        write_gz(tmp_path / name, payload)
    else:
        (tmp_path / name).write_bytes(payload)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, name, "header says 5x28x28 = 3920 bytes")


def test_absurd_header_is_rejected_before_allocating(tmp_path: Path):
    make_idx_dir(tmp_path, compressed=False)
    header = (0x803).to_bytes(4, "big") + np.asarray([4_000_000_000, 28, 28], ">u4").tobytes()
    (tmp_path / TRAIN_IMAGES.removesuffix(".gz")).write_bytes(header + b"\0" * 100)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, "header says 4000000000x28x28")


def test_count_mismatch(tmp_path: Path):
    arrays = make_idx_dir(tmp_path)
    write_gz(tmp_path / TRAIN_LABELS, idx_bytes(arrays[TRAIN_LABELS][:-1], 0x801))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, "12 images", "11 labels")


def test_labels_out_of_range(tmp_path: Path):
    arrays = make_idx_dir(tmp_path)
    labels = arrays[TEST_LABELS].copy()
    labels[2] = 10
    write_gz(tmp_path / TEST_LABELS, idx_bytes(labels, 0x801))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(excinfo, "test labels", "..10", "10 classes")


def test_table_entries_are_consistent():
    assert data.DEFAULT_DATASET in data.DATASETS
    for name, spec in data.DATASETS.items():
        assert spec.tfds_name == name
        assert len(spec.class_names) == spec.num_classes
        assert len(spec.image_shape) == 3
    assert data.DATASETS["cifar10"].idx_files is None
    assert data.DATASETS["cifar10"].image_shape == (32, 32, 3)


# ----- device side --------------------------------------------------------------------------------


def test_steps_per_epoch_drops_partial_batch():
    assert data.steps_per_epoch(60_000, 256) == 234
    assert data.steps_per_epoch(512, 256) == 2
    assert data.steps_per_epoch(100, 256) == 0
    with pytest.raises(UserError):
        data.steps_per_epoch(100, 0)


@pytest.mark.parametrize(("n", "batch"), [(1001, 64), (256, 64), (3, 8)])
def test_eval_batches_count_each_example_once(n: int, batch: int):
    indices, mask = data.eval_batches(n, batch)
    assert indices.shape == mask.shape == (-(-n // batch), batch)
    assert indices.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(n))
    assert mask.sum() == n and indices.min() >= 0 and indices.max() < n

    values = jnp.asarray(np.random.default_rng(0).normal(size=n).astype(np.float32))

    @jax.jit
    def masked_sum(values, indices, mask):
        def body(total, batch):
            idx, m = batch
            return total + jnp.sum(jnp.where(m, values[idx], 0.0)), None

        return jax.lax.scan(body, jnp.float32(0), (indices, mask))[0]

    np.testing.assert_allclose(masked_sum(values, indices, mask), values.sum(), rtol=1e-5)


def test_eval_batches_empty():
    indices, mask = data.eval_batches(0, 16)
    assert indices.shape == mask.shape == (0, 16)


def test_epoch_permutation():
    n = 1000
    p0 = np.asarray(data.epoch_permutation(42, 0, n))
    np.testing.assert_array_equal(np.sort(p0), np.arange(n))
    np.testing.assert_array_equal(p0, data.epoch_permutation(42, 0, n))
    assert not np.array_equal(p0, data.epoch_permutation(42, 1, n))
    assert not np.array_equal(p0, data.epoch_permutation(43, 0, n))
    # A traced epoch gives the same order as a Python int.
    jitted = jax.jit(data.epoch_permutation, static_argnums=(0, 2))
    np.testing.assert_array_equal(jitted(42, jnp.int32(3), n), data.epoch_permutation(42, 3, n))


def test_preprocess():
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    same = data.preprocess(jnp.asarray(images), 28)
    assert same.shape == (4, 28, 28, 1) and same.dtype == jnp.float32
    np.testing.assert_allclose(same, images / 255.0, rtol=1e-6)

    up = jax.jit(data.preprocess, static_argnums=(1, 2))(jnp.asarray(images), 96, jnp.bfloat16)
    assert up.shape == (4, 96, 96, 1) and up.dtype == jnp.bfloat16
    up = np.asarray(up, np.float32)
    assert up.min() >= 0.0 and up.max() <= 1.0
    assert (up[0] == 0).all() and (up[1] == 1).all()
    # Bilinear upsampling keeps the mean brightness.
    np.testing.assert_allclose(up[2:].mean(), (images[2:] / 255.0).mean(), atol=0.01)

    down = data.preprocess(jnp.asarray(images), 14)
    assert down.shape == (4, 14, 14, 1)


def _crops_and_flips(image: np.ndarray, pad: int) -> list[tuple[int, int, bool, np.ndarray]]:
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            out += [(dy, dx, False, crop), (dy, dx, True, crop[:, ::-1])]
    return out


def test_augment():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(0.1, 1.0, (16, 32, 32, 3)).astype(np.float32))
    augment = jax.jit(data.augment)
    key = jax.random.key(0)
    out = augment(key, images)
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out, augment(key, images))
    assert not np.array_equal(out, augment(jax.random.key(1), images))

    # Each output is one crop of the 4-px zero-padded input, maybe flipped; both kinds occur.
    seen_flip, seen_shift = set(), set()
    for x, y in zip(np.asarray(images), np.asarray(out), strict=True):
        matches = [(dy, dx, f) for dy, dx, f, c in _crops_and_flips(x, 4) if np.array_equal(c, y)]
        assert len(matches) == 1
        dy, dx, flip = matches[0]
        seen_flip.add(flip)
        seen_shift.add((dy, dx) != (4, 4))
    assert seen_flip == {True, False} and True in seen_shift


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_random_erasing_fills_one_rectangle_with_noise(dtype):
    h, w, n = 24, 20, 256
    images = jnp.full((n, h, w, 1), 2.0, dtype)  # outside [0, 1): every erased pixel differs
    erase = jax.jit(data.random_erasing, static_argnums=2)
    key = jax.random.key(0)
    out = np.asarray(erase(key, images, 0.5), np.float32)
    assert out.shape == images.shape and erase(key, images, 0.5).dtype == dtype
    np.testing.assert_array_equal(out, np.asarray(erase(key, images, 0.5), np.float32))
    changed = out[..., 0] != 2.0
    erased = changed.any(axis=(1, 2))
    assert 128 - 30 < erased.sum() < 128 + 30  # Binomial(256, 0.5): 3.75 standard deviations
    areas, aspects = [], []
    for mask, image in zip(changed[erased], out[erased], strict=True):
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        assert mask[box].all() and mask.sum() == mask[box].size  # one filled rectangle
        assert ((image[box] >= 0) & (image[box] < 1)).all()  # uniform [0, 1) noise
        areas.append(mask.sum() / (h * w))
        aspects.append(len(rows) / len(cols))
    # U(2%, 40%) of the area, up to rounding the sides (~3% here) and clipping (which shrinks);
    # aspect ratios on both sides of 1.
    assert min(areas) >= 0.01 and max(areas) <= 0.45 and 0.15 < np.mean(areas) < 0.25
    assert min(aspects) < 0.8 and max(aspects) > 1.25
    np.testing.assert_array_equal(np.asarray(erase(key, images, 0.0)), np.asarray(images))
    assert np.asarray(erase(key, images, 1.0) != 2.0).any(axis=(1, 2, 3)).all()


def test_augment_pad_zero_only_flips():
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(32, 8, 8, 1)), jnp.float32)
    out = np.asarray(jax.jit(data.augment, static_argnums=2)(jax.random.key(3), images, 0))
    flipped = np.asarray(images)[:, :, ::-1]
    same = (out == np.asarray(images)).all(axis=(1, 2, 3))
    flip = (out == flipped).all(axis=(1, 2, 3))
    assert (same | flip).all() and same.any() and flip.any()
