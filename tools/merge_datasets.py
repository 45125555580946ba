"""Concatenate Megatron indexed datasets (``.bin``/``.idx`` pairs) into one, document boundaries kept.

    python tools/merge_datasets.py --input DIR --output-prefix OUT
    python tools/merge_datasets.py --input PREFIX_A PREFIX_B ... --output-prefix OUT

As Megatron-LM's ``tools/merge_datasets.py``, a directory input contributes every ``.bin``/``.idx`` pair in it,
in sorted name order; explicit prefixes are merged in the order given (a prefix may also be named by its
``.bin`` or ``.idx`` file). Every input is opened and checked before anything is written, all must share one
token dtype, and the result is written to temporary names renamed into place on success (.bin first, .idx
last), so ``OUT.idx`` never exists unless ``OUT.bin`` is complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from longctx_megatron.data.indexed_dataset import (
    IndexedDataset,
    building_dataset,
    dataset_exists,
    index_file_path,
)


def _prefixes_in_directory(directory: str) -> list[str]:
    """Prefixes of the dataset pairs in ``directory``, sorted; ValueError for a half pair."""
    found: dict[str, set[str]] = {}
    for name in os.listdir(directory):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, name)):
            found.setdefault(os.path.join(directory, stem), set()).add(ext)
    for prefix, extensions in found.items():
        if len(extensions) == 1:
            missing = ".idx" if ".bin" in extensions else ".bin"
            raise ValueError(f"{prefix}{missing} is missing: {prefix}{extensions.pop()} has no partner")
    return sorted(found)


def _resolve_inputs(inputs: list[str]) -> list[str]:
    """Dataset prefixes named by ``--input``: directories expanded, file names reduced to their prefix."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            prefixes.extend(_prefixes_in_directory(item))
        elif dataset_exists(item):
            prefixes.append(item)
        elif os.path.splitext(item)[1] in (".bin", ".idx") and dataset_exists(os.path.splitext(item)[0]):
            prefixes.append(os.path.splitext(item)[0])
        else:
            raise ValueError(f"{item}: neither a directory nor the prefix of a .bin/.idx pair")
    return prefixes


def _merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    for prefix, dataset in zip(prefixes[1:], datasets[1:], strict=True):
        if dataset.dtype != datasets[0].dtype:
            raise ValueError(
                f"dtype mismatch: {index_file_path(prefixes[0])} holds {datasets[0].dtype} tokens "
                f"but {index_file_path(prefix)} holds {dataset.dtype}"
            )
    with building_dataset(output_prefix, datasets[0].dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="DIR_OR_PREFIX",
        help="a directory holding .bin/.idx pairs (merged in sorted order), or dataset prefixes (in order)",
    )
    parser.add_argument("--output-prefix", required=True, help="output path without the .bin/.idx suffix")
    args = parser.parse_args(argv)

    output_prefix = args.output_prefix
    directory = os.path.dirname(output_prefix) or "."
    try:
        if not os.path.isdir(directory):
            raise ValueError(f"output directory {directory} does not exist")
        prefixes = _resolve_inputs(args.input)
        if not prefixes:
            raise ValueError(f"no .bin/.idx pairs found in {' '.join(args.input)}")
        if any(os.path.realpath(prefix) == os.path.realpath(output_prefix) for prefix in prefixes):
            raise ValueError(f"output prefix {output_prefix} is also an input; choose another output path")
        merged = _merge(prefixes, output_prefix)
    except (ValueError, OSError) as error:  # IndexedDatasetError is a ValueError
        print(f"merge_datasets: error: {error}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets into {output_prefix}: {len(merged)} sequences, "
        f"{len(merged.document_indices) - 1} documents, {merged.num_tokens} tokens of {merged.dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
