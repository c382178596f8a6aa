"""How close cifarkit's corruptions are to the reference generator's: one net's accuracy on each.

    python benchmarks/robustness_fidelity.py export --root DIR --ckpt CKPT --images N --out FOLDER
    (the reference's functions, in their own environment: FOLDER/clean.npy -> FOLDER/ref/<name>-<s>.npy)
    python benchmarks/robustness_fidelity.py compare --root DIR --ckpt CKPT --images N --out FOLDER

``export`` writes the N test images (``robustness.images=N``'s draw, seed 0) of the image-folder tree DIR
as FOLDER/clean.npy (N, 32, 32, 3) uint8, the input the reference's functions take one by one.
``compare`` scores the checkpoint's net (bf16 autocast on a CPU that computes in bf16, as eval.py) on
cifarkit's sets of the same images and on the reference's, and prints the accuracy of both per
corruption (mean over severities) and over all 75 sets, with the differences (docs/robustness.md,
Fidelity). The reference's outputs stay outside the repository.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cifarkit.core.devices import resolve_precision
from cifarkit.nets.saved import SavedNet
from cifarkit.robust.cache import make_set
from cifarkit.robust.corruptions import CORRUPTIONS, SEVERITIES
from cifarkit.robust.report import pick_images, score
from cifarkit.run.resolvers import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


def test_split(root: str, ckpt: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object, list]:
    """The test images eval.py would score (uint8 N x 3 x H x W), their labels and indices, the DataInfo and
    the trusted targets."""
    register_resolvers()
    info = SavedNet.read(ckpt).data
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", [f"ckpt_path={ckpt}", "data=image_folder", f"data.root={root}"])
    dm = instantiate(cfg.data, _convert_="all", image_size=info.image_size, mean=info.mean, std=info.std)
    dm.setup("test")
    x, y = dm.splits["test"]
    index = pick_images(len(y), n, 0)
    return x[index].contiguous(), y[index].contiguous(), index, info, list(cfg.trusted_targets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["export", "compare"])
    p.add_argument("--root", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    x, y, index, info, trusted = test_split(a.root, a.ckpt, a.images)
    if a.step == "export":
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "clean.npy", x.permute(0, 2, 3, 1).numpy())
        return
    saved = SavedNet.read(a.ckpt)
    net = saved.rebuild(trusted).eval()
    device = torch.device("cpu")
    precision = resolve_precision("auto", "cpu")
    context = (lambda: torch.autocast("cpu", torch.bfloat16)) if precision == "bf16-mixed" else None
    kw = {"context": context} if context else {}

    def acc(images: torch.Tensor) -> float:
        return score(net, images, y, info.mean, info.std, device, 500, **kw)[0]

    rows, ours_all, ref_all = [], [], []
    clean = acc(x)
    for name in CORRUPTIONS:
        ours, ref = [], []
        for s in SEVERITIES:
            ref_file = out / "ref" / f"{name}-{s}.npy"
            if not ref_file.exists():
                continue
            theirs = torch.from_numpy(np.load(ref_file, allow_pickle=False)).permute(0, 3, 1, 2).contiguous()
            ours.append(acc(make_set(x, index, name, s, 0, device, 500)))
            ref.append(acc(theirs))
        if ours:
            ours_all += ours
            ref_all += ref
            rows.append((name, 100 * np.mean(ours), 100 * np.mean(ref)))
    print(f"clean {100 * clean:.2f} on {len(y)} images")
    print("| corruption | cifarkit | reference | difference |\n| --- | ---: | ---: | ---: |")
    for name, o, r in rows:
        print(f"| {name} | {o:.2f} | {r:.2f} | {o - r:+.2f} |")
    o, r = 100 * np.mean(ours_all), 100 * np.mean(ref_all)
    print(f"| mean of {len(ours_all)} sets | {o:.2f} | {r:.2f} | {o - r:+.2f} |")
    print(json.dumps({"clean": clean, "rows": rows, "mean": [o, r]}))


if __name__ == "__main__":
    main()
