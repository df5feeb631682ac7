"""A training corpus as memory-mapped arrays, written once per corpus and read by every rank.

A stages job's ranks all need the training passages' texts (the BM25 index is built from them, the
teacher scores them, MNTP reads them). Loaded as a Python dict, MS MARCO's 8.8M passages are several
GB per rank and minutes of reading each; here the first process writes them once (`text.bin`, row
offsets, ids in corpus order and sorted for lookups) and every process maps the same pages. The store
is a read-only Mapping from id to text, in the corpus's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import Collection, ir_dataset_docs, load_source, open_ir_dataset, read_corpus, source_files, training_spec
from .errors import DataError

FILES = ("offsets.npy", "ids.npy", "sorted_ids.npy", "sorted_positions.npy")


class PassageStore(Mapping[str, str]):
    """id → text over the arrays `write_store` wrote, memory-mapped."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.offsets, self.ids, self.sorted_ids, self.sorted_positions = (
            np.load(directory / name, mmap_mode="r") for name in FILES)
        size = int(self.offsets[-1])
        self.text = np.memmap(directory / "text.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return (bytes(i).decode() for i in self.ids)

    def position(self, doc_id: str) -> int | None:
        """The passage's place in the corpus, or None."""
        key = doc_id.encode()
        at = int(np.searchsorted(self.sorted_ids, key))
        if at < len(self.sorted_ids) and self.sorted_ids[at] == key:
            return int(self.sorted_positions[at])
        return None

    def text_at(self, position: int) -> str:
        return bytes(self.text[self.offsets[position]:self.offsets[position + 1]]).decode()

    def __getitem__(self, doc_id: str) -> str:
        position = self.position(doc_id)
        if position is None:
            raise KeyError(doc_id)
        return self.text_at(position)

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self.position(doc_id) is not None

    def values(self) -> Texts:  # type: ignore[override] — a sequence in corpus order, not a view
        return Texts(self)


class Texts(Sequence[str]):
    """The store's texts in corpus order, read one at a time."""

    def __init__(self, store: PassageStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i):  # noqa: ANN001 — int or slice, as a Sequence takes
        if isinstance(i, slice):
            return [self.store.text_at(j) for j in range(*i.indices(len(self)))]
        return self.store.text_at(range(len(self))[i])

    def __iter__(self) -> Iterator[str]:
        return (self.store.text_at(j) for j in range(len(self)))


def write_store(directory: Path, docs: Iterable[tuple[str, str]], what: str) -> None:
    """The (id, text) pairs, streamed into `directory`; a repeated id is a DataError naming it."""
    directory = Path(directory)
    offsets, ids, at = [0], [], 0
    with open(directory / "text.bin", "wb") as out:
        for doc_id, text in docs:
            data = text.encode()
            out.write(data)
            at += len(data)
            offsets.append(at)
            ids.append(doc_id.encode())
    if not ids:
        raise DataError(f"{what}: no documents.")
    id_array = np.array(ids, dtype=bytes)
    del ids
    order = np.argsort(id_array, kind="stable")
    sorted_ids = id_array[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(repeated):
        raise DataError(f"{what}: duplicate document id '{sorted_ids[repeated[0]].decode()}'.")
    np.save(directory / "offsets.npy", np.array(offsets, dtype=np.int64))
    np.save(directory / "ids.npy", id_array)
    np.save(directory / "sorted_ids.npy", sorted_ids)
    np.save(directory / "sorted_positions.npy", order.astype(np.int64))



def training_collection(data_cfg: Mapping[str, Any], cache_root: Path) -> Collection:
    """The training collection with its passages in the store (queries and judgements read as usual)."""
    return load_source(training_spec(data_cfg), data_cfg.get("root"), docs=passage_store(data_cfg, cache_root))


def passage_store(data_cfg: Mapping[str, Any], cache_root: Path) -> PassageStore:
    """The training corpus's store: written by the first process to ask (the others wait on its lock),
    streamed from the source without holding it whole."""
    from .layout import passages_dir
    from .stages import build_once

    spec, what = training_spec(data_cfg), f"passages of {data_cfg['name']}"

    def docs() -> Iterable[tuple[str, str]]:
        if spec.get("source") == "ir_datasets":
            return ir_dataset_docs(open_ir_dataset(spec["name"], spec["id"]), spec["id"])
        return read_corpus(source_files(spec, data_cfg.get("root"))["corpus"]).items()

    return PassageStore(build_once(passages_dir(data_cfg, Path(cache_root)), lambda tmp: write_store(tmp, docs(), what),
                                   what))
