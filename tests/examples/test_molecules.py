"""Tests of the molecular task-weighting example: featurisation, tasks, split, model, a run."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rdkit import Chem

with warnings.catch_warnings():
    # torch_geometric 2.8.1 calls the deprecated torch.jit.script at import under torch 2.14.
    warnings.simplefilter("ignore", FutureWarning)
    from torch_geometric.data import Batch

    from examples.molecules import data as molecule_data
    from examples.molecules.featurize import (
        BOND_DIRS,
        BOND_STEREOS,
        BOND_TYPES,
        CHIRAL_TAGS,
        FORMAL_CHARGES,
        mol_to_graph,
        molecule_key,
        parse_smiles,
    )
    from examples.molecules.main import main
    from examples.molecules.model import GINEncoder, MoleculeModel
    from examples.molecules.tasks import (
        add_noise_tasks,
        compute_task_labels,
        is_noise_task,
        select_tasks_by_prevalence,
    )
    from examples.molecules.train import pt_loss

ATOM_TYPE, CHIRALITY, DEGREE, CHARGE, AROMATIC = range(5)
BOND_TYPE, BOND_DIR, BOND_STEREO = range(3)


def graph_of(smiles: str):
    mol = Chem.MolFromSmiles(smiles)
    assert mol is not None, smiles
    return mol_to_graph(mol)


# ----- featurisation -----


def test_ethanol_counts_and_types():
    graph = graph_of("CCO")
    assert graph.num_nodes == 3
    assert graph.edge_index.shape == (2, 4)
    assert graph.edge_attr.shape == (4, 3)
    assert graph.x[:, ATOM_TYPE].tolist() == [5, 5, 7]  # C, C, O (atomic number - 1)
    assert graph.x[:, DEGREE].tolist() == [1, 2, 1]
    assert graph.x[:, AROMATIC].sum() == 0
    assert (graph.edge_attr[:, BOND_TYPE] == BOND_TYPES.index(Chem.BondType.SINGLE)).all()


def test_edges_are_symmetric():
    graph = graph_of("CC(=O)Nc1ccc(O)cc1")  # paracetamol
    pairs = set(map(tuple, graph.edge_index.t().tolist()))
    assert all((target, source) in pairs for source, target in pairs)


def test_benzene_ring_and_aromatic_bonds():
    graph = graph_of("c1ccccc1")
    num_edges = graph.edge_index.shape[1] // 2
    assert graph.num_nodes == 6
    assert num_edges == 6
    assert num_edges - graph.num_nodes + 1 == 1  # cycle rank of a connected graph: one ring
    assert (graph.x[:, AROMATIC] == 1).all()
    aromatic = BOND_TYPES.index(Chem.BondType.AROMATIC)
    assert (graph.edge_attr[:, BOND_TYPE] == aromatic).all()


def test_cyclohexane_ring_not_aromatic():
    graph = graph_of("C1CCCCC1")
    assert graph.edge_index.shape[1] // 2 - graph.num_nodes + 1 == 1
    assert (graph.x[:, AROMATIC] == 0).all()
    assert (graph.x[:, DEGREE] == 2).all()


def test_chiral_centre_tagged():
    l_alanine = graph_of("N[C@@H](C)C(=O)O")
    d_alanine = graph_of("N[C@H](C)C(=O)O")
    unspecified = CHIRAL_TAGS.index(Chem.ChiralType.CHI_UNSPECIFIED)
    assert l_alanine.x[1, CHIRALITY] != unspecified
    assert d_alanine.x[1, CHIRALITY] != unspecified
    assert l_alanine.x[1, CHIRALITY] != d_alanine.x[1, CHIRALITY]
    others = [0, 2, 3, 4, 5]
    assert (l_alanine.x[others, CHIRALITY] == unspecified).all()


def test_double_bond_stereo_and_direction():
    graph = graph_of("F/C=C/F")  # trans-1,2-difluoroethene
    double = BOND_TYPES.index(Chem.BondType.DOUBLE)
    is_double = graph.edge_attr[:, BOND_TYPE] == double
    stereo = graph.edge_attr[is_double, BOND_STEREO]
    assert (stereo == BOND_STEREOS.index(Chem.BondStereo.STEREOE)).all()
    directions = graph.edge_attr[~is_double, BOND_DIR]
    assert (directions != BOND_DIRS.index(Chem.BondDir.NONE)).all()


def test_formal_charge_encoded():
    graph = graph_of("C[N+](C)(C)C")
    assert graph.x[1, CHARGE] == FORMAL_CHARGES.index(1)
    assert graph.x[0, CHARGE] == FORMAL_CHARGES.index(0)
    assert graph.x[1, DEGREE] == 4


def test_invalid_smiles_skipped_and_counted(caplog):
    smiles = ["CCO", "not a molecule", "C1CC", "", "c1ccccc1"]
    with caplog.at_level(logging.INFO):
        molecules, positions = parse_smiles(smiles, "unit-test")
    assert len(molecules) == 2
    assert positions == [0, 4]
    assert "unit-test: skipped 3 of 5 invalid SMILES" in caplog.text


def test_molecule_key_ignores_salt_and_stereo():
    salt = Chem.MolFromSmiles("CC(N)Cc1ccccc1.Cl")
    stereo = Chem.MolFromSmiles("C[C@H](N)Cc1ccccc1")
    assert molecule_key(salt) == molecule_key(stereo)


def test_pack_unpack_round_trip():
    graphs = [graph_of(s) for s in ("CCO", "c1ccccc1", "N[C@@H](C)C(=O)O", "[Na+]")]
    restored = molecule_data.unpack_graphs(molecule_data.pack_graphs(graphs))
    assert len(restored) == len(graphs)
    for original, copy in zip(graphs, restored):
        assert torch.equal(original.x, copy.x)
        assert torch.equal(original.edge_index, copy.edge_index)
        assert torch.equal(original.edge_attr, copy.edge_attr)


# ----- PT tasks -----


def test_task_labels_on_known_molecules():
    molecules = [Chem.MolFromSmiles(s) for s in ("c1ccccc1", "CCO", "CC(=O)O")]
    names, labels = compute_task_labels(molecules)
    assert labels.shape == (3, len(names))
    assert labels[:, names.index("fr_benzene")].tolist() == [1, 0, 0]
    assert labels[:, names.index("fr_COO")].tolist() == [0, 0, 1]
    assert labels[:, names.index("TPSA>90")].tolist() == [0, 0, 0]


def test_prevalence_filter_drops_constant_tasks():
    labels = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 1], [1, 0, 0]], dtype=np.uint8)
    names, kept_labels = select_tasks_by_prevalence(["always", "never", "half"], labels)
    assert names == ["half"]
    assert kept_labels.shape == (4, 1)


def test_noise_tasks_keep_prevalence():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < [0.1, 0.5, 0.8]).astype(np.uint8)
    names, extended = add_noise_tasks(["a", "b", "c"], labels, 4, seed=0)
    assert extended.shape == (200, 7)
    assert [is_noise_task(n) for n in names] == [False] * 3 + [True] * 4
    assert extended[:, 3].sum() == labels[:, 0].sum()
    assert extended[:, 6].sum() == labels[:, 0].sum()  # copy 3 shuffles task 0 again
    assert not np.array_equal(extended[:, 4], labels[:, 1])


# ----- scaffold split -----


def assert_scaffold_disjoint(scaffolds, splits):
    sets = [{scaffolds[i] for i in split} for split in splits]
    assert not sets[0] & sets[1]
    assert not sets[0] & sets[2]
    assert not sets[1] & sets[2]
    everything = np.sort(np.concatenate(splits))
    assert np.array_equal(everything, np.arange(len(scaffolds)))


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_scaffold_split_on_b3db(seed):
    _, smiles, _ = molecule_data.read_b3db()
    molecules, _ = parse_smiles(smiles[:400], "B3DB head")
    scaffolds = [molecule_data.scaffold_of(mol) for mol in molecules]
    splits = molecule_data.scaffold_split(scaffolds, (0.8, 0.1, 0.1), seed=seed)
    assert_scaffold_disjoint(scaffolds, splits)
    assert len(splits[0]) >= 0.7 * len(scaffolds)
    assert len(splits[2]) > 0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=200),
    st.one_of(st.none(), st.integers(min_value=0, max_value=10)),
)
def test_scaffold_split_property(labels, seed):
    scaffolds = [f"scaffold-{label}" for label in labels]
    splits = molecule_data.scaffold_split(scaffolds, (0.8, 0.1, 0.1), seed=seed)
    assert_scaffold_disjoint(scaffolds, splits)


def test_scaffold_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        molecule_data.scaffold_split(["a", "b"], (0.5, 0.5, 0.5))


# ----- data loading and cache -----


def test_data_cache_and_no_leak(tmp_path, caplog):
    kwargs = {"cache_dir": tmp_path, "max_ft_molecules": 120, "max_pt_molecules": 150}
    with caplog.at_level(logging.INFO):
        built = molecule_data.load_molecule_data(**kwargs)
        cached = molecule_data.load_molecule_data(**kwargs)
    assert not built.from_cache
    assert cached.from_cache
    assert "loaded cached molecule graphs" in caplog.text
    assert len(cached.pt_graphs) == len(built.pt_graphs)
    assert np.array_equal(cached.pt_labels, built.pt_labels)
    ft_keys = {molecule_key(Chem.MolFromSmiles(s)) for s in built.ft_smiles}
    pt_keys = {molecule_key(Chem.MolFromSmiles(s)) for s in built.pt_smiles}
    assert not ft_keys & pt_keys


def test_missing_package_error_names_fix():
    with pytest.raises(FileNotFoundError, match="pip install"):
        molecule_data.find_package_dir("no_such_package_for_metaopt", "pip install it")


# ----- model and loss -----


@pytest.mark.parametrize("pooling", ["mean", "add", "max"])
def test_model_output_shapes(pooling):
    torch.manual_seed(0)
    batch = Batch.from_data_list([graph_of(s) for s in ("CCO", "c1ccccc1", "[Na+].[Cl-]")])
    model = MoleculeModel(GINEncoder(layers=2, hidden=16, pooling=pooling), num_tasks=7)
    assert model.encoder(batch).shape == (3, 16)
    assert model(batch).shape == (3, 7)


def test_encoder_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="unknown pooling"):
        GINEncoder(pooling="median")


def test_pt_loss_uniform_at_zero_logits():
    torch.manual_seed(0)
    graphs = [graph_of(s) for s in ("CCO", "c1ccccc1")]
    for graph in graphs:
        graph.y = torch.tensor([[1.0, 0.0, 1.0]])
    batch = Batch.from_data_list(graphs)
    model = MoleculeModel(GINEncoder(layers=1, hidden=8), num_tasks=3)
    logits = torch.zeros(3, requires_grad=True)
    loss = pt_loss(model, batch, logits)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.y)
    assert torch.allclose(loss, plain)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert gradient.abs().sum() > 0


# ----- end to end -----


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_end_to_end_tiny_run(tmp_path, caplog, restore_torch_threads):
    out = tmp_path / "results"
    arguments = [
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--threads", "1",
        "--max-ft-molecules", "300", "--max-pt-molecules", "300",
        "--layers", "2", "--hidden", "16", "--noise-tasks", "3", "--seeds", "0", "1",
        "--pt-steps", "20", "--pt-batch-size", "32", "--warmup-steps", "4",
        "--hyper-interval", "2", "--meta-lr", "0.1", "--meta-ft-batch-size", "32",
        "--linear-steps", "20", "--finetune-epochs", "1", "--eval-batch-size", "64",
    ]
    main(arguments)
    results = json.loads((out / "results.json").read_text())
    for key in ("config", "data", "tasks", "runs", "summary", "task_weight_summary", "plots"):
        assert key in results
    assert len(results["runs"]) == 4
    assert {(r["arm"], r["seed"]) for r in results["runs"]} == {
        ("uniform", 0), ("uniform", 1), ("meta", 0), ("meta", 1)
    }
    for run in results["runs"]:
        assert len(run["pt_losses"]) == 20
        assert 0.0 <= run["linear"]["test_auroc"] <= 1.0
        assert 0.0 <= run["full"]["test_auroc"] <= 1.0
        assert (out / "checkpoints" / f"{run['arm']}-seed{run['seed']}.pt").is_file()
    for run in (r for r in results["runs"] if r["arm"] == "meta"):
        assert len(run["hypersteps"]) == 8  # steps 6, 8, ..., 20 after 4 warm-up steps
        assert np.abs(np.array(run["task_weights"]) - 1.0).max() > 1e-3
    for run in (r for r in results["runs"] if r["arm"] == "uniform"):
        assert run["hypersteps"] == []
        assert np.allclose(run["task_weights"], 1.0)
    assert results["data"]["noise_tasks"] == 3
    assert "paired" in results["summary"]["full"]
    for name in ("test_auroc.png", "task_weights.png", "meta_ft_val_loss.png"):
        assert (out / name).stat().st_size > 0

    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(arguments + ["--pt-steps", "4", "--arms", "uniform", "--seeds", "0"])
    assert "loaded cached molecule graphs" in caplog.text


@pytest.mark.parametrize(
    ("estimator", "ft_mode"), [("unrolled", "full"), ("first-order", "implicit")]
)
def test_estimator_and_ft_mode_flags(tmp_path, estimator, ft_mode, restore_torch_threads):
    out = tmp_path / "results"
    main([
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--threads", "1",
        "--max-ft-molecules", "200", "--max-pt-molecules", "200", "--layers", "2",
        "--hidden", "16", "--seeds", "0", "--arms", "meta", "--pt-steps", "8",
        "--pt-batch-size", "32", "--warmup-steps", "2", "--hyper-interval", "2",
        "--meta-ft-batch-size", "32", "--linear-steps", "10", "--finetune-epochs", "1",
        "--pt-estimator", estimator, "--ft-mode", ft_mode, "--unroll-steps", "2",
    ])
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert results["config"]["pt_estimator"] == estimator
    assert results["config"]["ft_mode"] == ft_mode
    assert len(run["hypersteps"]) == 3
    assert all(record["applied"] for record in run["hypersteps"])
