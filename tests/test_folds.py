"""k-fold cross-validation (``data.folds=K data.fold=i``): the folds of one seed partition the training set,
stratified, the same in every run; a sweep over the folds is summarized with the mean and std over them."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import datamodule, error_line
from test_sweeps import TINY, read_jobs, sweep_dirs


def folds(tmp_path: Path, k: int, seed: int = 42) -> list:
    """The CIFAR-10 source's datamodule for each fold, set up."""
    out = []
    for i in range(k):
        dm = datamodule(
            tmp_path,
            [
                "data=cifar10",
                f"paths.data_dir={tmp_path / 'data'}",
                f"data.folds={k}",
                f"data.fold={i}",
                f"data.split_seed={seed}",
            ],
        )
        dm.setup()
        out.append(dm)
    return out


def keys(images: torch.Tensor) -> list[tuple]:
    return [tuple(row) for row in images.flatten(1).tolist()]


def test_the_folds_of_one_seed_partition_the_training_set(tiny_cifar10: dict, tmp_path: Path) -> None:
    k = 5
    dms = folds(tmp_path, k)
    full = torch.load(dms[0].cache_file, weights_only=True)
    everything = sorted(keys(full["train_x"]))
    vals = [keys(dm.splits["val"][0]) for dm in dms]
    assert sorted(sum(vals, [])) == everything  # complete: every training image validates in exactly one fold
    for i, dm in enumerate(dms):
        assert set(vals[i]).isdisjoint(keys(dm.splits["train"][0]))  # disjoint: never trained on and validated
        assert sorted(vals[i] + keys(dm.splits["train"][0])) == everything  # the other folds train
        for j in range(i + 1, k):
            assert set(vals[i]).isdisjoint(vals[j])
    n, classes = len(full["train_y"]), full["train_y"].unique()
    for dm in dms:  # stratified: each fold a fifth of the images, and of each class (within one)
        labels = dm.splits["val"][1]
        assert abs(len(labels) - n / k) <= 1
        for c in classes:
            assert abs(int((labels == c).sum()) - int((full["train_y"] == c).sum()) / k) <= 1
    again = folds(tmp_path / "again", k)  # deterministic by seed; another seed, other folds
    assert all(torch.equal(a.splits["val"][0], b.splits["val"][0]) for a, b in zip(dms, again))
    other = folds(tmp_path / "other", k, seed=7)
    assert not torch.equal(other[0].splits["val"][0], dms[0].splits["val"][0])


def test_a_fold_outside_the_folds_is_one_line(tmp_path: Path, main) -> None:
    r = main("train.py", ["data.folds=5", "data.fold=5", f"paths.log_dir={tmp_path}"])
    assert r.code == 1
    assert "data.fold=5 must be below data.folds=5 (folds count from 0)" in error_line(r.err)


def test_a_sweep_over_the_folds_gives_their_mean_and_std(image_folder: Path, tmp_path: Path, main) -> None:
    r = main(
        "train.py",
        [
            "-m",
            *TINY,
            "data=image_folder",
            f"data.root={image_folder}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "test=false",
            "data.folds=3",
            "data.fold=range(3)",
        ],
    )
    assert r.code == 0, r.err[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs")
    jobs = read_jobs(sweep)
    assert [j["data.fold"] for j in jobs] == ["0", "1", "2"] and all(j["status"] == "completed" for j in jobs)
    (summary,) = read_jobs(sweep, "summary.csv")  # one configuration, its three folds grouped
    values = torch.tensor([float(j["val/acc_best"]) for j in jobs], dtype=torch.float64)
    assert summary["n"] == "3" and float(summary["val/acc_best"]) == pytest_approx(values.mean().item())
    assert float(summary["val/acc_best_std"]) == pytest_approx(values.std().item())
    assert "mean ± std over seeds and folds" in r.out


def pytest_approx(x: float):
    import pytest

    return pytest.approx(x, abs=1e-9)


def test_a_search_whose_objective_is_the_mean_over_folds(image_folder: Path, tmp_path: Path, main) -> None:
    import json

    import optuna

    logs = tmp_path / "logs"
    r = main(
        "train.py",
        [
            "hparams_search=lr_optuna",
            "hydra.sweeper.n_trials=2",
            *TINY,
            "data=image_folder",
            f"data.root={image_folder}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={logs}",
            "test=false",
            "data.folds=3",
            "data.fold=all",
        ],
    )
    assert r.code == 0, r.err[-3000:]
    study = optuna.load_study(study_name="lr_optuna", storage=f"sqlite:///{logs}/optuna/lr_optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    (sweep,) = sweep_dirs(logs)
    for trial in study.trials:
        job = sweep / str(trial.number)
        per_fold = [json.loads((job / f"fold-{i}" / "metrics.json").read_text()) for i in range(3)]
        values = torch.tensor([m["val/acc_best"] for m in per_fold], dtype=torch.float64)
        assert trial.value == pytest_approx(values.mean().item())  # the trial's value: the mean over its folds
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "completed" and record["folds"]["n"] == 3
        assert record["val/acc_best"] == pytest_approx(values.mean().item())
        assert record["folds"]["std"]["val/acc_best"] == pytest_approx(values.std().item())
        assert record["steps"] == sum(m["steps"] for m in per_fold)
        # the folds' pruning reports count epochs on: one step per epoch of the trial, none reported twice
        assert sorted(trial.intermediate_values) == list(range(1, record["epochs"] + 1))
    rows = read_jobs(sweep)
    assert [float(row["val/acc_best"]) for row in rows] == pytest_approx([t.value for t in study.trials])


def test_every_fold_needs_the_fold_count(tmp_path: Path, main) -> None:
    r = main("train.py", ["data.fold=all", f"paths.log_dir={tmp_path}"])
    assert r.code == 1
    assert "data.fold=all trains every fold of data.folds=K; set data.folds too" in error_line(r.err)


def test_every_fold_from_a_checkpoint_is_one_line(tmp_path: Path, main) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read")
    r = main("train.py", ["data.folds=3", "data.fold=all", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path}"])
    assert r.code == 1
    assert "with data.fold=all: every fold starts from the beginning" in error_line(r.err)
