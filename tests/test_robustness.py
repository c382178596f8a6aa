"""The corruption benchmark: each corruption's properties, the cached set's checksum, the report's
figures against a hand-computed case, eval.py's robustness=cifar10c end to end, and its bad input."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.cached_sets import read_cached_set
from cifarkit.data.augment import Augment
from cifarkit.data.loader import DeviceLoader
from cifarkit.fit.classifier import ImageClassifier
from cifarkit.robust import corruptions as C
from cifarkit.robust.cache import cached_set, digest, set_files
from cifarkit.robust.report import CSV_NAME, EXAMPLES, HEATMAP, Options, benchmark, pick_images
from cifarkit.run import schema
from cifarkit.run.jobs import train_job
from conftest import FAST, error_line, folder_overrides, run_dirs


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Photo-like uint8 images (smooth colour fields from a coarse grid), on which blurs and shifts act."""
    coarse = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    fine = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8)


# The reference's parameters do not move every corruption further from the clean image at each step:
# elastic_transform's affine shift shrinks from severity 1 (0.08 of the side) to 5 (0.03) while its
# warp grows; glass_blur's severities 2-3 and 4-5 trade blur for a second round of pixel moves. For
# those two the distance is the one that grows: the blurred image's (elastic: its local warp only).
NOT_MONOTONE_IN_PIXELS = {"elastic_transform", "glass_blur", "frost"}


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_each_corruption_is_deterministic_keeps_range_and_grows_with_severity(name: str) -> None:
    x = smooth_images(24)
    index = torch.arange(100, 124)
    distances = []
    for s in C.SEVERITIES:
        y = C.corrupt(x, name, s, index, seed=7)
        assert y.dtype == torch.uint8 and y.shape == x.shape
        assert torch.equal(y[3:5], C.corrupt(x[3:5], name, s, index[3:5], seed=7))  # not the batch: the image
        if name not in ("zoom_blur", "contrast", "brightness", "defocus_blur", "pixelate", "jpeg_compression"):
            assert not torch.equal(y, C.corrupt(x, name, s, index, seed=8)), "another seed, other draws"
        distances.append((y.float() - x.float()).abs().mean().item())
    assert distances[0] > 0
    if name in NOT_MONOTONE_IN_PIXELS:
        assert distances[-1] > 0.5 * distances[0]
    else:
        for lower, higher in zip(distances, distances[1:]):
            assert higher >= 0.97 * lower, (name, distances)
        assert distances[-1] > 1.5 * distances[0], (name, distances)


def test_corruptions_match_the_schema_names() -> None:
    assert schema.CORRUPTIONS == C.CORRUPTIONS


def test_corruptions_at_another_image_size() -> None:
    """A net trained on 24-pixel images: every corruption keeps that size (fog's map, frost's crop)."""
    x = smooth_images(2, size=24)
    for name in C.CORRUPTIONS:
        assert C.corrupt(x, name, 5, torch.arange(2), 0).shape == x.shape


def test_the_cache_catches_a_changed_byte_and_a_truncated_file(tmp_path: Path) -> None:
    x = smooth_images(6)
    index, source = torch.arange(6), digest(x)
    args = (x, index, "gaussian_noise", 3, 0, tmp_path, torch.device("cpu"), 4, source)
    made, cached = cached_set(*args)
    assert not cached
    again, cached = cached_set(*args)
    assert cached and torch.equal(made, again)
    pixels, record = set_files(tmp_path, "gaussian_noise", 3)
    expected = json.loads(record.read_text())
    expected.pop("sha256")
    raw = bytearray(pixels.read_bytes())
    raw[100] ^= 1
    pixels.write_bytes(bytes(raw))
    assert read_cached_set(pixels, record, expected) == (None, "checksum mismatch")
    remade, cached = cached_set(*args)  # made again, never evaluated as it was
    assert not cached and torch.equal(remade, made)
    pixels.write_bytes(pixels.read_bytes()[:-5])
    data, why = read_cached_set(pixels, record, expected)
    assert data is None and "bytes where the record says" in why
    record.write_text("{not json")
    assert read_cached_set(pixels, record, expected)[1].startswith("unreadable record")
    cached_set(*args)
    assert read_cached_set(pixels, record, expected | {"seed": 1}) == (None, "made with another seed")


def test_report_of_a_net_that_always_answers_one_class(tmp_path: Path) -> None:
    """Every set's accuracy is the share of class 0, its ECE |p - share| (one confidence p, one bin)."""
    x = smooth_images(10)
    y = torch.tensor([0, 0, 0, 1, 2, 1, 2, 0, 1, 2])
    share, p = 0.4, 0.7
    logits = torch.log(torch.tensor([p, 0.2, 0.1]))
    info = SimpleNamespace(mean=[0.5] * 3, std=[0.25] * 3)
    opts = Options(("contrast", "fog"), (1, 4), None, 0, 4)
    metrics = benchmark(
        lambda t: logits.expand(len(t), 3), (x, y), info, opts, tmp_path / "cache", tmp_path, torch.device("cpu")
    )
    r = "robustness"
    for key in (f"{r}/clean", f"{r}/contrast/1", f"{r}/contrast/4", f"{r}/fog/1", f"{r}/fog/4", f"{r}/fog"):
        assert metrics[f"{key}/acc"] == pytest.approx(share)
        assert metrics[f"{key}/ece"] == pytest.approx(p - share, abs=1e-6)
    assert metrics[f"{r}/mean_corrupted_acc"] == pytest.approx(share)
    assert metrics[f"{r}/mce_unnormalized"] == pytest.approx(1 - share)
    assert metrics[f"{r}/relative"] == pytest.approx(1.0)
    assert metrics[f"{r}/sets_made"] == 4 and metrics[f"{r}/images"] == 10
    rows = list(csv.DictReader((tmp_path / CSV_NAME).open()))
    assert [(row["corruption"], row["severity"]) for row in rows] == [
        ("clean", "0"), ("contrast", "1"), ("contrast", "4"), ("fog", "1"), ("fog", "4"),
    ]  # fmt: skip
    assert all(float(row["acc"]) == pytest.approx(share) for row in rows)
    for name in (HEATMAP, EXAMPLES):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.size[0] > 200 and im.size[1] > 100
    board = TensorBoardLogger(tmp_path / "tb", name="", version="")
    again = benchmark(
        lambda t: logits.expand(len(t), 3), (x, y), info, opts, tmp_path / "cache", tmp_path, torch.device("cpu"),
        loggers=[board],
    )  # fmt: skip
    assert again[f"{r}/sets_cached"] == 4 and again[f"{r}/sets_made"] == 0
    board.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert set(events.Tags()["images"]) == {HEATMAP, EXAMPLES}
    assert events.Scalars(f"{r}/mean_corrupted_acc")[0].value == pytest.approx(share)


def test_images_option_draws_a_seeded_subset_in_split_order() -> None:
    some = pick_images(36, 20, seed=3)
    assert len(set(some.tolist())) == 20 and torch.equal(some, some.sort().values) and int(some.max()) < 36
    assert torch.equal(some, pick_images(36, 20, seed=3)) and not torch.equal(some, pick_images(36, 20, seed=4))
    assert torch.equal(pick_images(36, None, 0), torch.arange(36))


def test_bad_options_in_one_line() -> None:
    ok = {"corruptions": ["fog"], "severities": [1], "images": None, "seed": 0, "batch_size": 8}
    with pytest.raises(UserError, match="not a corruption of CIFAR-10-C; choose among gaussian_noise, shot_noise"):
        Options.of(SimpleNamespace(**ok | {"corruptions": ["fogg"]}))
    with pytest.raises(UserError, match="robustness.severities holds 6; choose among 1, 2, 3, 4, 5"):
        Options.of(SimpleNamespace(**ok | {"severities": [6]}))


@pytest.fixture
def tiny_ckpt(image_folder: Path, compose_cfg, tmp_path: Path) -> str:
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["test=false"]))
    return str(tmp_path / "out" / "checkpoints" / "last.ckpt")


def test_eval_robustness_end_to_end_and_cached(image_folder: Path, tiny_ckpt: str, main, tmp_path: Path) -> None:
    """eval.py robustness=cifar10c on a subset: metrics.json, the CSV and the pictures; the second run
    reads every set from the cache and scores them the same."""
    logs = tmp_path / "logs"
    args = [
        *FAST[:1], f"ckpt_path={tiny_ckpt}", *folder_overrides(image_folder, tmp_path), f"paths.log_dir={logs}",
        "robustness=cifar10c", "robustness.corruptions=[snow,pixelate]", "robustness.severities=[2,5]",
        "callbacks.progress_bar=null",
    ]  # fmt: skip
    first = main("eval.py", args)
    assert first.code == 0, first.err[-3000:]
    time.sleep(1.1)  # run directories are named by the second (configs/hydra/default.yaml): the second run's is another
    second = main("eval.py", args)
    assert second.code == 0, second.err[-3000:]
    runs = run_dirs(logs, "eval")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in runs)
    assert a["robustness/sets_made"] == 4 and b["robustness/sets_cached"] == 4 and b["robustness/sets_made"] == 0
    assert a["robustness/images"] == 36
    for key in ("robustness/snow/5/acc", "robustness/pixelate/2/ece", "robustness/mean_corrupted_acc"):
        assert a[key] == b[key] and 0 <= a[key] <= 1
    assert a["robustness/clean/acc"] == pytest.approx(a["test/acc"], abs=1e-6)  # the same net, images and precision
    for d in runs:
        assert (d / CSV_NAME).is_file() and (d / f"{HEATMAP}.png").is_file() and (d / f"{EXAMPLES}.png").is_file()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("robustness.corruptions=[fogg]", "robustness.corruptions[0]=fogg: must be one of gaussian_noise, shot_noise"),
        ("robustness.severities=[0,6]", "robustness.severities[0]=0: must be an integer from 1 to 5"),
    ],
)
def test_eval_refuses_a_bad_corruption_or_severity(option: str, message: str, main, tmp_path: Path) -> None:
    r = main("eval.py", [f"ckpt_path={tmp_path / 'none.ckpt'}", "robustness=cifar10c", option])
    assert r.code == 1
    assert message in error_line(r.err)


AUGMIX = {"width": 3, "depth": 0, "severity": 3, "views": 2}


def test_augmix_views_on_the_device_pipeline() -> None:
    """The clean view is the crop-and-flip pipeline's own batch; the two mixes differ from it and from
    each other, stay images in [0, 1] before normalization, and repeat for the same seed."""
    x, y = smooth_images(40), torch.arange(40) % 10
    steps = {"crop": {"padding": 2, "mode": "reflect"}, "flip": {"p": 0.5}}
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)

    def first(augment: dict) -> torch.Tensor:
        loader = DeviceLoader(x, y, mean, std, 16, True, seed=3, augment=Augment.from_steps(augment))
        return next(iter(loader))[0]

    plain, mixed = first(steps), first(steps | {"augmix": AUGMIX})
    assert mixed.shape == (16, 3, 3, 32, 32)
    assert torch.allclose(mixed[:, 0], plain, atol=1e-6)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (mixed[:, a] - mixed[:, b]).abs().mean() > 0.05
    images = mixed * 0.25 + 0.5
    assert images.min() >= -1e-5 and images.max() <= 1 + 1e-5
    assert torch.equal(mixed, first(steps | {"augmix": AUGMIX}))
    assert first(steps | {"augmix": AUGMIX | {"views": 0}}).shape == (16, 3, 32, 32)


def test_consistency_loss_is_augmix_jensen_shannon() -> None:
    """Views that the net sees alike add nothing to the cross-entropy; views it sees otherwise add the
    weighted Jensen-Shannon divergence, computed here by hand."""
    torch.manual_seed(0)
    net = {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [8, 16, 16]}
    kw = {"optimizer": None, "scheduler": None, "param_groups": None, "label_smoothing": 0.0, "tta": "none"}
    model = ImageClassifier(net, list("abcdefghij"), **kw, channels_last=False, compile=False, consistency=12.0)
    model.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        same = torch.stack([x, x, x], 1)
        ce = F.cross_entropy(model(x), y)
        assert float(model.training_step((same, y), 0)) == pytest.approx(float(ce), rel=1e-5)
        views = torch.stack([x, x.flip(-1), x * 0.5], 1)
        p = torch.stack([model(views[:, i]).softmax(-1) for i in range(3)])
        m = p.mean(0)
        js = sum((q * (q / m).log()).sum(-1).mean() for q in p) / 3
        assert float(js) > 1e-4
        assert float(model.training_step((views, y), 0)) == pytest.approx(float(ce + 12.0 * js), rel=1e-4)


def test_augmix_runs_on_the_device_pipeline_only(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=cpu10_augmix", "data.pipeline=torchvision"])
    with pytest.raises(UserError, match="alternating_flip, cutout and augmix run on the device pipeline only"):
        schema.check(cfg)


def test_the_augmix_preset_trains(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    data = [o for o in folder_overrides(image_folder, tmp_path) if not o.startswith("data.val_size")]
    cfg = compose_cfg(
        FAST + data + ["experiment=cpu10_augmix", "budget_s=null", "trainer.max_steps=3", "data.batch_size=8",
                       "model.net.widths=[8,16,16]", "trainer.max_time=null"]
    )  # fmt: skip
    metrics = train_job(cfg)
    assert math.isfinite(metrics) or math.isnan(metrics)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["steps"] == 3 and math.isfinite(saved["train/loss"]) and 0 <= saved["test/acc"] <= 1
