"""Datasets: load whole splits on the host as uint8 numpy, then batch and augment on the device.

Host side: `load_dataset` finds a dataset in one of three forms, chosen automatically:

1. a prepared TFDS data dir, read with `tfds.data_source` (array_record; needs no TensorFlow);
2. a TFDS manual dir (`<data_dir>/downloads/manual/`) holding the original files: prepared with
   TFDS if TensorFlow is installed, otherwise its IDX files are read directly;
3. a folder holding the original IDX files (`.gz` as distributed, or uncompressed), read with
   numpy + gzip, no TensorFlow at all.

Device side: the trainer puts the whole uint8 dataset on the devices once and gathers batches
inside jit, so everything per step here is a pure, jittable jnp function.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import math
import os
import warnings
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The dataset table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the loaders need to know about one dataset; everything per-dataset lives here.

    Attributes:
      tfds_name: the TFDS builder name (also the folder name in a TFDS data dir).
      num_classes: labels are 0 .. num_classes - 1.
      image_shape: (H, W, C) of one image.
      class_names: one name per label.
      idx_files: for IDX datasets, `(split, images file, labels file)` per split, with the
        original (gzipped) file names; None for datasets not distributed as IDX.
      system_dirs: folders where an OS package installs the original files.
    """

    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    idx_files: tuple[tuple[str, str, str], ...] | None
    system_dirs: tuple[str, ...] = ()

    @property
    def idx_file_names(self) -> tuple[str, ...]:
        """All original IDX file names, train first (empty for non-IDX datasets)."""
        if self.idx_files is None:
            return ()
        return tuple(name for _, images, labels in self.idx_files for name in (images, labels))


# MNIST, Fashion-MNIST and KMNIST are all distributed under these four names.
_MNIST_STYLE_FILES = (
    ("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("test", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)

DEFAULT_DATASET = "fashion_mnist"

DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        tfds_name="fashion_mnist",
        num_classes=10,
        image_shape=(28, 28, 1),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        idx_files=_MNIST_STYLE_FILES,
        # Debian's package dataset-fashion-mnist.
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
    "mnist": DatasetSpec(
        tfds_name="mnist",
        num_classes=10,
        image_shape=(28, 28, 1),
        class_names=tuple(str(d) for d in range(10)),
        idx_files=_MNIST_STYLE_FILES,
    ),
    "kmnist": DatasetSpec(
        tfds_name="kmnist",
        num_classes=10,
        image_shape=(28, 28, 1),
        class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        idx_files=_MNIST_STYLE_FILES,
    ),
    "cifar10": DatasetSpec(
        tfds_name="cifar10",
        num_classes=10,
        image_shape=(32, 32, 3),
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        idx_files=None,
    ),
}


class DataError(UserError):
    """A data folder or data file that cannot be used; the message is one line."""

    def __init__(self, message: str):
        # Messages may embed text from other libraries (TFDS, zlib); keep them to one line.
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in host memory.

    Attributes:
      train_images, test_images: uint8 [N, H, W, C].
      train_labels, test_labels: int32 [N].
      spec: the dataset's table entry.
      source: which way the data was found, for logs (e.g. "raw IDX files in /data/fmnist").
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    spec: DatasetSpec
    source: str


def get_spec(name: str) -> DatasetSpec:
    """The table entry for `name`; a DataError listing the valid names if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        valid = ", ".join(sorted(DATASETS))
        raise DataError(f"unknown dataset {name!r}; valid names: {valid}") from None


# ---------------------------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------------------------


def load_dataset(name: str = DEFAULT_DATASET, data_dir: str | Path | None = None) -> Dataset:
    """Loads the train and test splits of `name` into host memory.

    With `data_dir` given, it must hold one of: a prepared TFDS data dir, a TFDS manual dir
    (`downloads/manual/` with the original files), or the original IDX files themselves
    (tried in that order). With `data_dir=None`, TFDS's default data dir (`$TFDS_DATA_DIR` or
    `~/tensorflow_datasets`) and the dataset's system folders (e.g. Debian's) are searched.

    Raises:
      DataError: unknown name, missing folder, nothing usable found, or a corrupt file.
    """
    spec = get_spec(name)
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise DataError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"data folder {root} is not a folder")
        found = _load_from(spec, root)
        if found is None:
            raise DataError(
                f"no usable {spec.tfds_name} data in {root}{_missing_note(spec, root)}: "
                f"expected {_expected(spec)}"
            )
        return found

    places = _default_places(spec)
    for place in places:
        if place.is_dir() and (found := _load_from(spec, place)) is not None:
            return found
    where = ", ".join(str(p) for p in places)
    if _tensorflow_available():
        # Online with TensorFlow installed: TFDS's own download into its default data dir.
        try:
            _prepare_with_tensorflow(spec, places[0], None)
            return _read_tfds(spec, places[0], f"downloaded and prepared by TFDS in {places[0]}")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. no network: fall through to the message
            where += f"; TFDS download failed: {' '.join(str(e).split())[:200]}"
    raise DataError(
        f"no {spec.tfds_name} data found in the usual places ({where}); pass --data_dir with "
        f"{_expected(spec)}"
    )


def _missing_note(spec: DatasetSpec, root: Path) -> str:
    """' (has A, lacks B)' when `root` holds some but not all IDX files, else ''."""
    names = spec.idx_file_names
    present = [n for n in names if _find_one(root, n) is not None]
    if not present:
        return ""
    lacking = [n for n in names if n not in present]
    return f" (has {', '.join(present)}; lacks {', '.join(lacking)})"


def _default_places(spec: DatasetSpec) -> list[Path]:
    # Same default as TFDS itself, read at call time so that tests and users can set it late.
    tfds_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return [Path(tfds_dir).expanduser(), *(Path(d) for d in spec.system_dirs)]


def _expected(spec: DatasetSpec) -> str:
    """One line naming the three accepted layouts, for 'nothing found' messages."""
    name = spec.tfds_name
    prepared = f"(1) a prepared TFDS data dir ({name}/<version>/ with array_record files)"
    if spec.idx_files is None:
        return (
            f"{prepared} or (2) a TFDS manual dir (downloads/manual/ with the original download; "
            f"preparing it needs TensorFlow); (3) raw IDX files are not a format of {name}"
        )
    files = ", ".join(spec.idx_file_names)
    return (
        f"{prepared}, (2) a TFDS manual dir (downloads/manual/ with the original files) or "
        f"(3) a folder with the original IDX files {files} (gzipped or not)"
    )


def _load_from(spec: DatasetSpec, root: Path) -> Dataset | None:
    """Tries the three ways in order on one folder; None if none applies."""
    if _is_prepared_tfds(spec, root):
        return _read_tfds(spec, root, f"prepared TFDS dataset in {root}")

    manual = root / "downloads" / "manual"
    if manual.is_dir():
        found = _load_manual_dir(spec, root, manual)
        if found is not None:
            return found

    files = _find_idx_files(spec, root)
    if files is not None:
        return _read_idx_dataset(spec, files, f"raw IDX files in {root}")
    return None


def _is_prepared_tfds(spec: DatasetSpec, root: Path) -> bool:
    # Cheap check first: asking TFDS about a folder without a `<name>/` subfolder only logs
    # warnings (and importing TFDS costs time), and most folders we look at are raw IDX folders.
    if not (root / spec.tfds_name).is_dir():
        return False
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.tfds_name, data_dir=str(root))
        if not builder.is_prepared():
            return False
        formats = builder.info.available_file_formats()
    except Exception as e:  # A damaged TFDS folder: say which, in one line.
        raise DataError(f"cannot read TFDS metadata of {spec.tfds_name} in {root}: {e}") from e
    if not formats & tfds.core.FileFormat.with_random_access():
        # tfds.data_source needs random access; TFDS's default (tfrecord) has none.
        log.warning(
            "%s in %s is prepared as %s, which tfds.data_source cannot read; ignoring it "
            "(re-prepare with file_format='array_record')",
            spec.tfds_name,
            root,
            ", ".join(sorted(f.value for f in formats)) or "an unknown format",
        )
        return False
    return True


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _load_manual_dir(spec: DatasetSpec, root: Path, manual: Path) -> Dataset | None:
    """Way 2: prepare the manual dir with TFDS if TensorFlow is there, else read it directly."""
    idx = _find_idx_files(spec, manual) if spec.idx_files is not None else None
    if spec.idx_files is not None and idx is None:
        return None  # Not (all of) the originals: not a manual dir for this dataset.
    if spec.idx_files is None and not any(manual.iterdir()):
        return None

    if _tensorflow_available():
        try:
            _prepare_with_tensorflow(spec, root, manual)
        except DataError:
            raise
        except Exception as e:  # Any TFDS failure: IDX files can still be read directly.
            # E.g. Debian's copies: same data, different gzip headers, so TFDS's checksums fail.
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if idx is None:
                raise DataError(
                    f"TFDS could not prepare {spec.tfds_name} from {manual}: {reason}"
                ) from e
            log.warning(
                "TFDS could not prepare %s (%s); reading the IDX files directly",
                spec.tfds_name,
                reason,
            )
            return _read_idx_dataset(
                spec,
                idx,
                f"raw IDX files in TFDS manual dir {manual} "
                f"(TFDS preparation failed with {type(e).__name__}, read directly)",
            )
        return _read_tfds(
            spec, root, f"TFDS manual dir {manual}, prepared with TensorFlow into {root}"
        )

    if idx is None:
        return None  # Non-IDX originals need TFDS (and so TensorFlow) to be decoded.
    return _read_idx_dataset(
        spec,
        idx,
        f"raw IDX files in TFDS manual dir {manual} (TensorFlow not installed, read directly)",
    )


def _prepare_with_tensorflow(spec: DatasetSpec, root: Path, manual: Path | None) -> None:
    """Runs TFDS's own preparation into `root`, as array_record: from the manual dir `manual`,
    or, with `manual=None`, from TFDS's download."""
    import tensorflow as tf

    # TensorFlow takes every GPU (and most of its memory) the first time it runs anything.
    # This process's GPUs belong to JAX, so hide them before TFDS touches TensorFlow.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TensorFlow was already initialised by someone else.
        if tf.config.get_visible_devices("GPU"):
            raise DataError(
                "TensorFlow was already initialised with a GPU visible; prepare the TFDS "
                "dataset in a separate process (or run with CUDA_VISIBLE_DEVICES='')"
            ) from e

    import tensorflow_datasets as tfds

    log.info("preparing %s with TFDS from %s", spec.tfds_name, manual or "the internet")
    builder = tfds.builder(spec.tfds_name, data_dir=str(root), file_format="array_record")
    if manual is None:
        builder.download_and_prepare()
        return
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual),
            # Offline machines: never ask GCS for a pre-built copy.
            try_download_gcs=False,
        )
    )


# ----- way 1: prepared TFDS data dir ---------------------------------------------------------

# Examples decoded per __getitems__ call: big enough to amortise the per-call overhead, small
# enough that the list of decoded dicts stays a few MB.
_TFDS_CHUNK = 4096


def _read_tfds(spec: DatasetSpec, root: Path, source: str) -> Dataset:
    import tensorflow_datasets as tfds

    arrays = {}
    try:
        sources = tfds.data_source(spec.tfds_name, data_dir=str(root), download=False)
        for split in ("train", "test"):
            if split not in sources:
                raise DataError(f"prepared TFDS {spec.tfds_name} in {root} has no {split!r} split")
            arrays[split] = _tfds_split_to_numpy(spec, sources[split], f"{root} ({split})")
    except DataError:
        raise
    except Exception as e:  # Damaged array_record files or metadata: one line, not a traceback.
        raise DataError(
            f"cannot read prepared TFDS {spec.tfds_name} in {root}: {type(e).__name__}: {e}"
        ) from e
    return _make_dataset(spec, arrays, source)


def _tfds_split_to_numpy(spec: DatasetSpec, source, where: str) -> tuple[np.ndarray, np.ndarray]:
    # TFDS decodes each record (a PNG) separately whatever we do; batched __getitems__ is about
    # 3x faster than indexing one example at a time, and stays the only per-example work.
    n = len(source)
    images = np.empty((n, *spec.image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _TFDS_CHUNK):
        stop = min(start + _TFDS_CHUNK, n)
        examples = source.__getitems__(list(range(start, stop)))
        for ex in examples:
            # Checked before copying: numpy would silently broadcast e.g. 1 channel to 3.
            if ex["image"].shape != spec.image_shape:
                raise DataError(
                    f"images in {where} have shape {ex['image'].shape}, "
                    f"expected {spec.image_shape} for {spec.tfds_name}"
                )
        images[start:stop] = np.stack([ex["image"] for ex in examples])
        labels[start:stop] = [ex["label"] for ex in examples]
    return images, labels


# ----- ways 2 and 3: original IDX files ------------------------------------------------------

# IDX magic numbers: two zero bytes, a type byte (0x08 = unsigned byte), and the number of dims.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"


def _find_idx_files(spec: DatasetSpec, folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """The split -> (images, labels) paths in `folder`, or None unless all of them are there."""
    if spec.idx_files is None:
        return None
    found = {}
    for split, images, labels in spec.idx_files:
        paths = tuple(_find_one(folder, name) for name in (images, labels))
        if None in paths:
            return None
        found[split] = paths
    return found


def _find_one(folder: Path, gz_name: str) -> Path | None:
    # Prefer an uncompressed copy when both exist: it needs no decompression.
    for name in (gz_name.removesuffix(".gz"), gz_name):
        if (folder / name).is_file():
            return folder / name
    return None


# sha256 of Fashion-MNIST's decompressed label payloads (equal in Debian's copies, whose gzip
# headers differ). MNIST and KMNIST use the same file names, so a folder of the wrong dataset,
# or files swapped between the splits, would otherwise load without a word.
_FASHION_LABELS_SHA256 = {
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7": "train",
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9": "test",
}


def _check_identity(spec: DatasetSpec, split: str, labels: np.ndarray, path: Path) -> str:
    """Raises DataError for Fashion-MNIST's labels in the wrong place; returns their digest."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, np.uint8).tobytes()).hexdigest()
    found = _FASHION_LABELS_SHA256.get(digest)
    if found is not None and spec.tfds_name != "fashion_mnist":
        raise DataError(f"{path} holds Fashion-MNIST's {found} labels, not {spec.tfds_name}'s; "
                        f"point --data_dir at a folder of {spec.tfds_name}'s files")
    if found is not None and found != split:
        raise DataError(f"{path} holds Fashion-MNIST's {found} labels where its {split} labels "
                        "belong: are the train and t10k files swapped?")
    if found is None and spec.tfds_name == "fashion_mnist" and len(labels) in (60_000, 10_000):
        # Full-sized files that are not Fashion-MNIST's: most likely MNIST's or KMNIST's, whose
        # files have the same names and sizes. (A subset or a made-up file is someone's choice.)
        warnings.warn(f"{path} is not Fashion-MNIST's published {split} labels (MNIST's or "
                      "KMNIST's files have the same names); loading it anyway", stacklevel=2)
    return digest


def _read_idx_dataset(
    spec: DatasetSpec, files: dict[str, tuple[Path, Path]], source: str
) -> Dataset:
    arrays, digests = {}, {}
    for split, (images_path, labels_path) in files.items():
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC, "images")
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, "labels")
        if images.shape[1:] != spec.image_shape[:2] or spec.image_shape[2] != 1:
            raise DataError(
                f"{images_path}: images are {'x'.join(map(str, images.shape[1:]))}, "
                f"expected {spec.image_shape[0]}x{spec.image_shape[1]} for {spec.tfds_name}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{images_path.name} holds {len(images)} images but {labels_path.name} holds "
                f"{len(labels)} labels (in {images_path.parent})"
            )
        digests[split] = _check_identity(spec, split, labels, labels_path)
        arrays[split] = (images[..., None], labels.astype(np.int32))
    if len(set(digests.values())) < len(digests):
        raise DataError(f"the train and test labels in {source} are identical: one file for both?")
    return _make_dataset(spec, arrays, source)


def _read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (gzipped or not), checking it against its header.

    Decompresses once, straight into the result array, so the whole compressed and
    decompressed file are never held twice.
    """
    compressed = False
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            dims = _read_idx_header(f, path, magic, what)
            expected = math.prod(dims)
            _check_plausible_size(path, dims, expected, compressed)
            out = np.empty(dims, np.uint8)
            got = _read_into(f, memoryview(out).cast("B")) + _count_rest(f)
    except EOFError as e:  # gzip: the stream stops before its end marker.
        raise DataError(f"{path}: truncated gzip file ({e})") from e
    except (gzip.BadGzipFile, zlib.error) as e:  # Bad header, CRC or deflate data.
        raise DataError(f"{path}: corrupt gzip file ({type(e).__name__}: {e})") from e
    except OSError as e:  # Permissions, I/O errors.
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if got != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: IDX header says {shape} = {expected} bytes of data but the file holds {got}"
        )
    return out


def _read_idx_header(f, path: Path, magic: int, what: str) -> tuple[int, ...]:
    head = _read_exact(f, 4)
    got = None if head is None else int.from_bytes(head, "big")
    if got != magic:
        shown = "missing" if got is None else f"0x{got:08x}"
        raise DataError(
            f"{path}: not an IDX {what} file (magic number {shown}, expected 0x{magic:08x})"
        )
    ndim = magic & 0xFF  # The magic number's last byte is the number of dimensions.
    dims_raw = _read_exact(f, 4 * ndim)
    if dims_raw is None:
        raise DataError(f"{path}: IDX header is cut short")
    return tuple(int(d) for d in np.frombuffer(dims_raw, ">u4"))


def _check_plausible_size(path: Path, dims: tuple[int, ...], expected: int, compressed: bool):
    # Before allocating: a damaged header must not ask for terabytes. Uncompressed files must
    # match exactly; deflate cannot compress better than about 1032:1.
    size = path.stat().st_size
    header = 4 + 4 * len(dims)
    limit = 1032 * size + (1 << 16) if compressed else size - header
    if expected > limit:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: IDX header says {shape} = {expected} bytes of data but the file is only "
            f"{size} bytes{' (gzipped)' if compressed else ''}"
        )


def _read_exact(f, n: int) -> bytes | None:
    data = f.read(n)
    return data if len(data) == n else None


def _read_into(f, buffer: memoryview) -> int:
    # readinto may return early (e.g. at gzip member boundaries); keep going until EOF.
    got = 0
    while got < len(buffer) and (n := f.readinto(buffer[got:])):
        got += n
    return got


def _count_rest(f) -> int:
    # Reading to the end also makes gzip check the stream's CRC and length trailer.
    extra = 0
    while chunk := f.read(1 << 16):
        extra += len(chunk)
    return extra


def _make_dataset(
    spec: DatasetSpec, arrays: dict[str, tuple[np.ndarray, np.ndarray]], source: str
) -> Dataset:
    for split, (_, labels) in arrays.items():
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DataError(
                f"{split} labels from {source} range over {labels.min()}..{labels.max()}, "
                f"but {spec.tfds_name} has {spec.num_classes} classes (0..{spec.num_classes - 1})"
            )
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    return Dataset(train_x, train_y, test_x, test_y, spec=spec, source=source)


# ---------------------------------------------------------------------------------------------
# Device side (pure, jittable)
# ---------------------------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int | jax.Array, num_examples: int) -> jax.Array:
    """The order of the training examples in `epoch`: int32 [num_examples].

    Depends only on (seed, epoch), so a resumed run replays the same order; `epoch` may be
    traced (the trainer can compute it inside jit from the step).
    """
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.permutation(key, num_examples)


def preprocess(images_u8: jax.Array, image_size: int,
               dtype: jnp.dtype | type = jnp.float32) -> jax.Array:
    """uint8 [B, H, W, C] -> `dtype` [B, image_size, image_size, C] in [0, 1].

    Like D2L's `Resize(image_size)` + `ToTensor()`: bilinear with antialiasing, no mean/std
    normalisation. (torchvision resizes the PIL image in uint8 before scaling; we keep the
    float: at 96x96 they differ by at most 1/255, 0.16/255 on average; see
    scripts/check_torch_parity.py.)
    """
    if images_u8.dtype != jnp.uint8:  # float images in [0, 1] would be divided by 255 again
        raise TypeError(f"preprocess takes uint8 images, got {images_u8.dtype}")
    x = images_u8.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    if (h, w) != (image_size, image_size):
        x = jax.image.resize(x, (b, image_size, image_size, c), method="linear", antialias=True)
        # Bilinear weights are convex, but rounding can step a hair outside [0, 1].
        x = jnp.clip(x, 0.0, 1.0)
    return x.astype(dtype)


def augment(key: jax.Array, images: jax.Array, pad: int | None = None) -> jax.Array:
    """Random crop after zero padding, and random horizontal flip, per example.

    images: [B, H, W, C]; returns the same shape and dtype. `pad` defaults to H // 8 (4 px at
    32, 12 at 96), the usual CIFAR-style shift of an eighth of the image.
    """
    _, h, w, c = images.shape
    pad = h // 8 if pad is None else pad

    def one(k: jax.Array, image: jax.Array) -> jax.Array:
        k_crop, k_flip = jax.random.split(k)
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1, :], crop)

    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(one)(keys, images)


def random_erasing(key: jax.Array, images: jax.Array, prob: float,
                   scale: tuple[float, float] = (0.02, 0.4),
                   ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> jax.Array:
    """Random erasing (Zhong et al. 2020), per example: with probability ``prob``, a rectangle
    of ``U(scale)`` of the image's area, aspect ratio (height / width) log-uniform in
    ``ratio``, is filled with uniform [0, 1) noise, as the paper's Fashion-MNIST setting.

    images: [B, H, W, C] in [0, 1]; returns the same shape and dtype. Where the drawn rectangle
    is taller or wider than the image, its side is clipped to it (the paper and torchvision
    redraw instead, which needs a data-dependent loop; at these scales that is rare: only
    aspect ratios beyond ~2.5 at the largest areas clip).
    """
    _, h, w, _ = images.shape

    def one(k: jax.Array, image: jax.Array) -> jax.Array:
        k_apply, k_area, k_ratio, k_y, k_x, k_fill = jax.random.split(k, 6)
        area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * h * w
        aspect = jnp.exp(jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]),
                                            maxval=math.log(ratio[1])))
        eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
        ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
        y0 = jax.random.randint(k_y, (), 0, h - eh + 1)
        x0 = jax.random.randint(k_x, (), 0, w - ew + 1)
        rows = jnp.arange(h)[:, None, None]
        cols = jnp.arange(w)[None, :, None]
        inside = (rows >= y0) & (rows < y0 + eh) & (cols >= x0) & (cols < x0 + ew)
        erase = inside & jax.random.bernoulli(k_apply, prob)
        return jnp.where(erase, jax.random.uniform(k_fill, image.shape, image.dtype), image)

    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(one)(keys, images)


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices int32 [num_batches, batch_size] covering every example once, and a bool mask.

    The last batch is padded with index 0 and mask False, so that all batches have one shape
    (one compilation) and masked sums count each example exactly once.
    """
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    num_batches = math.ceil(num_examples / batch_size)
    flat = np.arange(num_batches * batch_size, dtype=np.int32)
    mask = flat < num_examples
    indices = np.where(mask, flat, 0).astype(np.int32)
    return indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only (the last partial batch is dropped).

    0 when batch_size > num_examples; the caller says which flag to change.
    """
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    return num_examples // batch_size
