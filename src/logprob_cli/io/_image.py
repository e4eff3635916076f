"""The model's image (methods/_image.py) from a file: a matrix saved by numpy, or a GGUF model's output layer.

- .npy: a V x d matrix (the output layer's columns; an output bias as one more column if the model has one);
- .npz: the array "matrix" (as .npy), or "basis", a V x r basis already orthonormal whose span holds the
  ones vector (as `save_image` writes it: loading it skips the factorisation);
- .gguf: `output.weight`, else the tied `token_embd.weight`, dequantized with the `gguf` package (the
  optional extra `image`), with `output.bias` as one more column where the model has one.

The ones vector is always added (a matrix) or checked to be in the span (a basis). The row count must be
the vocabulary size; the plan refuses an image whose rows are not (methods/_image.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from logprob_cli.errors import LogprobError
from logprob_cli.methods import Image

ORTHONORMAL_TOLERANCE = 1e-8


class ImageError(LogprobError, ValueError):
    """The image file cannot be used: missing, of an unknown kind, not a V x d matrix, a basis that is not
    orthonormal, or a GGUF without an output layer (or without the `gguf` package)."""


def load_image(path: str | os.PathLike) -> Image:
    """The image a file holds (module doc); raises ImageError."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {str(path)!r} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".gguf":
            return Image.from_matrix(_gguf_output_matrix(path), path.name)
        if suffix == ".npy":
            return Image.from_matrix(np.load(path, allow_pickle=False), path.name)
        if suffix == ".npz":
            return _from_npz(path)
    except (OSError, ValueError) as error:  # a corrupt file, or a matrix that is not V x d
        raise ImageError(f"image file {path.name!r} cannot be read: {error}") from None
    raise ImageError(f"image file {path.name!r}: expected .npy, .npz or .gguf")


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
