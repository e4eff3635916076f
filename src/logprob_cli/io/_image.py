"""The model's image (methods/_image.py) from a file: a matrix saved by numpy, or a GGUF model's output layer.

- .npy: a V x d matrix (the output layer's columns; an output bias as one more column if the model has one);
- .npz: the array "matrix" (as .npy), or "basis", a V x r basis already orthonormal whose span holds the
  ones vector (as `save_image` writes it: loading it skips the factorisation);
- .gguf: `output.weight`, else the tied `token_embd.weight`, dequantized with the `gguf` package (the
  optional extra `image`), with `output.bias` as one more column where the model has one;
- .safetensors: `lm_head.weight`, else the tied `model.embed_tokens.weight` (or any `*embed_tokens.weight`),
  with `lm_head.bias` where present; read here from the format itself (an 8-byte header length, a JSON header,
  little-endian arrays), since the `safetensors` package's numpy loader cannot read bfloat16, the dtype most
  models ship in; a folder (a Hugging Face model) is searched for them in its *.safetensors files;
- .parquet: an earlier run's output, its whole vectors (rows with every token recovered, written with
  --store vector), through `Image.from_vectors` at the largest precision its rows state: the rank from their
  singular values. Refused where the vectors are too few for their rank to have settled (methods/_image.py's
  `learning_prompts`): the image of fewer vectors than the model's rank would be only part of it.

The ones vector is always added (a matrix) or checked to be in the span (a basis). The row count must be
the vocabulary size; the plan refuses an image whose rows are not (methods/_image.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from logprob_cli.errors import LogprobError, Worded
from logprob_cli.methods import Image, learning_prompts

ORTHONORMAL_TOLERANCE = 1e-8


class ImageError(LogprobError, ValueError):
    """The image file cannot be used: missing, of an unknown kind, not a V x d matrix, a basis that is not
    orthonormal, or a GGUF without an output layer (or without the `gguf` package)."""


def load_image(path: str | os.PathLike) -> Image:
    """The image a file holds (module doc); raises ImageError."""
    path = Path(path)
    if path.is_dir():
        return _from_safetensors(path, sorted(path.glob("*.safetensors")))
    if not path.is_file():
        raise ImageError(f"image file {str(path)!r} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _from_safetensors(path, [path])
        if suffix == ".parquet":
            return _from_output(path)
        if suffix == ".gguf":
            return Image.from_matrix(_gguf_output_matrix(path), path.name)
        if suffix == ".npy":
            return Image.from_matrix(np.load(path, allow_pickle=False), path.name)
        if suffix == ".npz":
            return _from_npz(path)
    except ImageError:
        raise  # already says what is wrong with the file, in the words of whoever reads it
    except (OSError, ValueError) as error:  # a corrupt file, or a matrix that is not V x d
        raise ImageError(f"image file {path.name!r} cannot be read: {error}") from None
    raise ImageError(
        f"image file {path.name!r}: expected .npy, .npz, .gguf, .safetensors, an earlier run's .parquet output, or a "
        "model folder holding .safetensors files"
    )


def image_setting(image: str | os.PathLike | Image | None) -> Image | str | None:
    """An image as a run takes it (--image, image=): None (none), "auto" (learned by the run, run/_learning.py), an
    Image as it is, else the image read from the file it names (load_image; ImageError)."""
    return image if image is None or isinstance(image, Image) or image == "auto" else load_image(image)


def save_image(image: Image, path: str | os.PathLike) -> None:
    """Write the image's basis as .npz ("basis"), which load_image reads without factorising again."""
    np.savez(path, basis=image.basis, source=np.array(image.source))


def _from_npz(path: Path) -> Image:
    """A .npz's "basis" (checked orthonormal, the ones vector in its span) or "matrix"."""
    with np.load(path, allow_pickle=False) as saved:
        if "basis" in saved:
            basis = np.asarray(saved["basis"], dtype=np.float64)
            source = str(saved["source"]) if "source" in saved else path.name
            _check_basis(basis, path.name)
            return Image(basis, source)
        if "matrix" in saved:
            return Image.from_matrix(saved["matrix"], path.name)
    raise ImageError(f"image file {path.name!r} holds neither \"matrix\" nor \"basis\"")


def _check_basis(basis: np.ndarray, name: str) -> None:
    """Raise ImageError unless basis has orthonormal columns whose span holds the ones vector."""
    if basis.ndim != 2 or not np.isfinite(basis).all():
        raise ImageError(f"image file {name!r}: the basis must be a finite V x r matrix, got shape {basis.shape}")
    gram_error = np.abs(basis.T @ basis - np.eye(basis.shape[1])).max()
    ones = np.ones(basis.shape[0]) / np.sqrt(basis.shape[0])
    outside = np.linalg.norm(ones - basis @ (basis.T @ ones))
    if gram_error > ORTHONORMAL_TOLERANCE or outside > ORTHONORMAL_TOLERANCE:
        raise ImageError(
            f"image file {name!r}: its basis is not orthonormal with the ones vector in its span "
            f"(errors {gram_error:.2g}, {outside:.2g}); save the matrix as \"matrix\" instead"
        )


def _gguf_output_matrix(path: Path) -> np.ndarray:
    """The V x d output layer of a GGUF model (module doc), dequantized, with its bias as one more column."""
    try:
        import gguf
    except ImportError:
        raise ImageError("reading a GGUF image needs the gguf package: pip install 'logprob-cli[image]'") from None
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    weight = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if weight is None:
        raise ImageError(f"image file {path.name!r} has neither output.weight nor token_embd.weight")
    matrix = gguf.quants.dequantize(weight.data, weight.tensor_type)
    bias = tensors.get("output.bias")
    if bias is not None:
        matrix = np.hstack([matrix, gguf.quants.dequantize(bias.data, bias.tensor_type).reshape(-1, 1)])
    return matrix


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
OUTPUT_NAMES = ("lm_head.weight", "model.embed_tokens.weight")


def _from_safetensors(path: Path, files: list[Path]) -> Image:
    """The image of the output layer in `files` (module doc): lm_head.weight, else the tied embeddings, with
    lm_head.bias as one more column where present."""
    headers = {file: _safetensors_header(file) for file in files}
    where = {name: file for file, header in headers.items() for name in header if not name.startswith("__")}
    embeddings = sorted(name for name in where if name.endswith("embed_tokens.weight"))
    found = next((name for name in (*OUTPUT_NAMES, *embeddings) if name in where), None)
    if found is None:
        raise ImageError(
            f"{path.name!r} holds no lm_head.weight nor embed_tokens.weight in "
            f"{len(files)} .safetensors file{'' if len(files) == 1 else 's'}: not a language model's weights"
        )
    matrix = _safetensors_tensor(where[found], headers[where[found]], found)
    if "lm_head.bias" in where:
        bias = _safetensors_tensor(where["lm_head.bias"], headers[where["lm_head.bias"]], "lm_head.bias")
        matrix = np.hstack([matrix, bias.reshape(-1, 1)])
    return Image.from_matrix(matrix, f"{path.name}: {found}")


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a .safetensors file: each tensor's dtype, shape and byte range after the header."""
    try:
        with open(file, "rb") as stream:
            size = int.from_bytes(stream.read(8), "little")
            if not 2 <= size <= file.stat().st_size - 8:
                raise ValueError("its header length does not fit the file")
            return json.loads(stream.read(size)) | {"__start__": 8 + size}
    except (OSError, ValueError) as error:
        raise ImageError(f"{file.name!r} is not a readable .safetensors file: {error}") from None


def _safetensors_tensor(file: Path, header: dict, name: str) -> np.ndarray:
    """One tensor of a .safetensors file as float32 (bfloat16 widened exactly: its bits are float32's top half)."""
    entry = header[name]
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ImageError(f"{file.name!r}: {name} is {entry['dtype']}, not a float type this reader knows "
                         f"({', '.join(SAFETENSORS_DTYPES)})")
    begin, end = entry["data_offsets"]
    data = np.fromfile(file, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                       offset=header["__start__"] + begin)
    if entry["dtype"] == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32).reshape(entry["shape"])


def _from_output(path: Path) -> Image:
    """The image of an earlier run's whole vectors (module doc)."""
    table = pq.read_table(path)
    if "logprobs" not in table.column_names:
        raise ImageError(Worded("{name!r} holds no whole vectors (no logprobs column): write it with {store} vector",
                                 name=path.name))
    precisions = table.column("precision_nats").to_pylist()
    rows = [(vector, p) for vector, p in zip(table.column("logprobs").to_pylist(), precisions) if vector is not None]
    vectors = np.array([vector for vector, _ in rows], dtype=np.float64) if rows else np.zeros((0, 0))
    whole = np.isfinite(vectors).all(axis=1) if rows else np.zeros(0, dtype=bool)
    if not whole.any():
        raise ImageError(f"{path.name!r} holds no whole vector (every row has unrecovered tokens)")
    precision = max(p for (_, p), keep in zip(rows, whole) if keep)
    image = Image.from_vectors(vectors[whole], precision, f"{path.name}: {int(whole.sum())} whole vectors")
    if whole.sum() < learning_prompts(image.rank):
        raise ImageError(Worded(
            "{name!r} holds {count} whole vectors of rank {rank}: too few to trust that rank (about {needed} are "
            "needed); run more prompts into it, or give {image} auto",
            name=path.name, count=int(whole.sum()), rank=image.rank, needed=learning_prompts(image.rank),
        ))
    return image
