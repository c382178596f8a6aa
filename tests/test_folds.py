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
