"""trainer=ddp_sim: two CPU processes train one run, each on its own half of the data.

``RankProbe`` is loaded into both ranks (PYTHONPATH=tests) and records, per rank, a digest of
every training image it was fed (augmentation off, so an image's digest is stable) and how
many validation/test images it evaluated.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from conftest import FAST, folder_overrides, run_cli, run_dirs

from cifarkit.data import DeviceLoader
from cifarkit.train import evaluate


class RankProbe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen["train"] += [round(float(x.double().sum()), 3) for x in batch[0]]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0 and not trainer.sanity_checking:
            self.seen["val"].append(len(batch[1]))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["test"].append(len(batch[1]))

    def on_test_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def test_epoch_indices_split_every_split_across_ranks() -> None:
    n = 11
    loaders = [
        [DeviceLoader(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), torch.zeros(3),
                      torch.ones(3), 4, train=train, seed=3, rank=r, world_size=2) for r in (0, 1)]
        for train in (True, False)
    ]
    (t0, t1), (e0, e1) = loaders
    a, b = set(t0.epoch_indices(0).tolist()), set(t1.epoch_indices(0).tolist())
    assert len(a) == len(b) == 5 and not a & b  # equal, disjoint training shares
    assert set(t0.epoch_indices(1).tolist()) != a  # reshuffled each epoch
    a, b = e0.epoch_indices(0).tolist(), e1.epoch_indices(0).tolist()
    assert sorted(a + b) == list(range(n))  # evaluation: every image exactly once over the ranks
    assert (len(e0), len(e1)) == (2, 2)


def test_ddp_sim_trains_one_run_on_split_data(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    logs, probe = tmp_path / "logs", tmp_path / "probe"
    args = FAST + folder_overrides(image_folder, tmp_path) + [
        "trainer=ddp_sim", "trainer.max_epochs=2", "data.augment.crop_padding=0", "data.augment.hflip_p=0",
        f"paths.log_dir={logs}", "+callbacks.rank_probe._target_=test_ddp.RankProbe", f"+callbacks.rank_probe.out={probe}",
    ]
    tests_dir = str(Path(__file__).parent)
    pythonpath = os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    r = run_cli("train.py", args, cwd=tmp_path, env={"PYTHONPATH": pythonpath})
    assert r.returncode == 0, r.stderr[-3000:]

    (run,) = run_dirs(logs)  # one run directory, with one of everything
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log"]
    assert len(list(run.rglob("metrics.json"))) == 1
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[0].startswith("epoch_") and ckpts[1] == "last.ckpt", ckpts
    assert len(list(run.rglob("hparams.yaml"))) == 1

    # Each rank trained on its own half: 60 training images, 30 per rank, batch 8.
    seen = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]
    s0, s1 = set(seen[0]["train"]), set(seen[1]["train"])
    assert len(seen[0]["train"]) == len(seen[1]["train"]) == 30
    assert not s0 & s1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["steps"] == 2 * math.ceil(30 / 8)

    # Validation and test: every image evaluated once over both ranks, metrics synced across them.
    assert sum(seen[0]["val"]) + sum(seen[1]["val"]) == 12
    assert sum(seen[0]["test"]) + sum(seen[1]["test"]) == 36
    eval_args = ["trainer=cpu", *folder_overrides(image_folder, tmp_path), f"ckpt_path={metrics['best_ckpt']}"]
    cfg = compose_cfg(eval_args, config_name="eval")
    single = evaluate(cfg)
    assert math.isclose(single["test/acc"], metrics["test/acc"], abs_tol=1e-6)
    assert math.isclose(single["test/loss"], metrics["test/loss"], rel_tol=1e-3)
