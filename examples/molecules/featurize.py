"""RDKit molecules to categorical graphs in the style of Hu et al. 2020.

Every atom becomes a row of integer feature indices (atomic number, chirality tag, degree,
formal charge, aromaticity) and every bond becomes two directed edges carrying integer
indices (bond type, bond direction, bond stereo). The model embeds each column separately,
as in the categorical encoding of W. Hu et al., "Strategies for Pre-training Graph Neural
Networks", ICLR 2020.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from rdkit import Chem, RDLogger
from rdkit.Chem import rdchem
from torch_geometric.data import Data

__all__ = [
    "ATOM_FEATURE_SIZES",
    "BOND_FEATURE_SIZES",
    "FEATURE_VERSION",
    "atom_features",
    "bond_features",
    "largest_fragment",
    "mol_to_graph",
    "molecule_key",
    "parse_smiles",
]

logger = logging.getLogger(__name__)

# Bump whenever the encoding below changes, so that cached graphs are rebuilt.
FEATURE_VERSION = 1

MAX_ATOMIC_NUMBER = 118
CHIRAL_TAGS = (
    rdchem.ChiralType.CHI_UNSPECIFIED,
    rdchem.ChiralType.CHI_TETRAHEDRAL_CW,
    rdchem.ChiralType.CHI_TETRAHEDRAL_CCW,
    rdchem.ChiralType.CHI_OTHER,
)
MAX_DEGREE = 10
FORMAL_CHARGES = tuple(range(-5, 6))
BOND_TYPES = (
    rdchem.BondType.SINGLE,
    rdchem.BondType.DOUBLE,
    rdchem.BondType.TRIPLE,
    rdchem.BondType.AROMATIC,
)
BOND_DIRS = (
    rdchem.BondDir.NONE,
    rdchem.BondDir.BEGINWEDGE,
    rdchem.BondDir.BEGINDASH,
    rdchem.BondDir.ENDDOWNRIGHT,
    rdchem.BondDir.ENDUPRIGHT,
)
BOND_STEREOS = (
    rdchem.BondStereo.STEREONONE,
    rdchem.BondStereo.STEREOANY,
    rdchem.BondStereo.STEREOZ,
    rdchem.BondStereo.STEREOE,
    rdchem.BondStereo.STEREOCIS,
    rdchem.BondStereo.STEREOTRANS,
)

# Number of categories per feature column. The last index of every column means "other".
ATOM_FEATURE_SIZES: tuple[int, ...] = (
    MAX_ATOMIC_NUMBER + 1,  # atomic number 1..118 at index 0..117, dummy atoms at 118
    len(CHIRAL_TAGS) + 1,
    MAX_DEGREE + 2,
    len(FORMAL_CHARGES) + 1,
    2,  # aromatic: 0 or 1
)
BOND_FEATURE_SIZES: tuple[int, ...] = (
    len(BOND_TYPES) + 1,
    len(BOND_DIRS) + 1,
    len(BOND_STEREOS) + 1,
)


def _index_or_other(value: object, choices: Sequence[object]) -> int:
    """Return the position of `value` in `choices`, or len(choices) for an unlisted value."""
    try:
        return choices.index(value)
    except ValueError:
        return len(choices)


def atom_features(atom: Chem.Atom) -> list[int]:
    """Return the categorical feature indices of one atom, one entry per ATOM_FEATURE_SIZES."""
    atomic_number = atom.GetAtomicNum()
    if 1 <= atomic_number <= MAX_ATOMIC_NUMBER:
        atom_type = atomic_number - 1
    else:
        atom_type = MAX_ATOMIC_NUMBER
    return [
        atom_type,
        _index_or_other(atom.GetChiralTag(), CHIRAL_TAGS),
        min(atom.GetDegree(), MAX_DEGREE + 1),
        _index_or_other(atom.GetFormalCharge(), FORMAL_CHARGES),
        int(atom.GetIsAromatic()),
    ]


def bond_features(bond: Chem.Bond) -> list[int]:
    """Return the categorical feature indices of one bond, one entry per BOND_FEATURE_SIZES."""
    return [
        _index_or_other(bond.GetBondType(), BOND_TYPES),
        _index_or_other(bond.GetBondDir(), BOND_DIRS),
        _index_or_other(bond.GetStereo(), BOND_STEREOS),
    ]


def mol_to_graph(mol: Chem.Mol) -> Data:
    """Convert an RDKit molecule (implicit hydrogens) to a graph.

    Returns a Data with `x` [num_atoms, 5] int64, `edge_index` [2, 2 * num_bonds] int64 (each
    bond in both directions) and `edge_attr` [2 * num_bonds, 3] int64.
    """
    x = torch.tensor([atom_features(atom) for atom in mol.GetAtoms()], dtype=torch.long)
    x = x.reshape(-1, len(ATOM_FEATURE_SIZES))
    sources: list[int] = []
    targets: list[int] = []
    attributes: list[list[int]] = []
    for bond in mol.GetBonds():
        begin, end = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        features = bond_features(bond)
        sources += [begin, end]
        targets += [end, begin]
        attributes += [features, features]
    edge_index = torch.tensor([sources, targets], dtype=torch.long).reshape(2, -1)
    edge_attr = torch.tensor(attributes, dtype=torch.long).reshape(-1, len(BOND_FEATURE_SIZES))
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, num_nodes=x.shape[0])


def parse_smiles(smiles: Iterable[str], source: str) -> tuple[list[Chem.Mol], list[int]]:
    """Parse SMILES strings, skipping invalid or empty ones.

    Returns the molecules and their positions in the input. The number of skipped strings is
    logged with `source` (a name for the input, used only in the log message).
    """
    molecules: list[Chem.Mol] = []
    positions: list[int] = []
    total = 0
    RDLogger.DisableLog("rdApp.*")  # one summary line below replaces RDKit's per-molecule errors
    try:
        for position, text in enumerate(smiles):
            total += 1
            mol = Chem.MolFromSmiles(text) if text else None
            if mol is None or mol.GetNumAtoms() == 0:
                continue
            molecules.append(mol)
            positions.append(position)
    finally:
        RDLogger.EnableLog("rdApp.*")
    skipped = total - len(molecules)
    if skipped:
        logger.warning("%s: skipped %d of %d invalid SMILES", source, skipped, total)
    else:
        logger.info("%s: parsed all %d SMILES", source, total)
    return molecules, positions


def molecule_key(mol: Chem.Mol) -> str:
    """Return a canonical SMILES of the largest fragment without stereochemistry.

    Two entries with the same key are treated as the same compound when PT molecules are
    checked against FT molecules, so salts and stereoisomers of an FT molecule also count.
    """
    return Chem.MolToSmiles(largest_fragment(mol), isomericSmiles=False)


def largest_fragment(mol: Chem.Mol) -> Chem.Mol:
    """Return the connected component with the most heavy atoms (salts drop their counterion)."""
    fragments = Chem.GetMolFrags(mol, asMols=True)
    return max(fragments, key=lambda fragment: fragment.GetNumHeavyAtoms())
