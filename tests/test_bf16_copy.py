"""Adam keeping the bf16 weights of a bf16-mixed CPU fit (cifarkit/fit/bf16_copy.py): the same
arithmetic as torch's fused Adam, the same fit, a state dict torch's Adam resumes from, and a plain
fit wherever it does not apply, said in one line."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import open_dict
from torch import nn

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.compiled_cache import inductor_cache_fault
from cifarkit.fit import bf16_copy
from cifarkit.fit.classifier import compiled
from cifarkit.fit.optim import FreezeParameters
from cifarkit.run.jobs import train_job
from conftest import FAST, folder_overrides

ROOT = Path(__file__).resolve().parents[1]


def small_net() -> nn.Module:
    """Tensors whose sizes are multiples of 32: every element in the vectorized body of torch's kernel."""
    return nn.Sequential(nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(96, 256)).to(memory_format=torch.channels_last)


def twins(
    make: type[torch.optim.Adam], **options
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, bf16_copy.Bf16CopyAdam]:
    torch.manual_seed(0)
    net = small_net()
    twin = small_net()
    twin.load_state_dict(net.state_dict())
    return (
        net,
        make(net.parameters(), fused=True, **options),
        twin,
        bf16_copy.keeping(twin, make(twin.parameters(), fused=True, **options)),
    )


def step_both(net, plain, twin, kept, steps: int) -> None:
    """``steps`` steps of each optimizer on the same bf16 gradients (as autocast's backward gives them)."""
    for _ in range(steps):
        for p, q in zip(net.parameters(), twin.parameters()):
            g = torch.randn_like(p).to(torch.bfloat16)
            p.grad = g.float()
            kept.copies[q].grad = g
        plain.step()
        kept.step()


@pytest.mark.parametrize(
    ("make", "options"),
    [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.05}), (torch.optim.Adam, {"betas": (0.8, 0.99)})],
)
def test_the_step_is_torchs_fused_adam_bit_for_bit(make, options) -> None:
    net, plain, twin, kept = twins(make, lr=1e-3, **options)
    step_both(net, plain, twin, kept, 6)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(plain.state[p]["exp_avg"], kept.state[q]["exp_avg"])
        assert torch.equal(plain.state[p]["exp_avg_sq"], kept.state[q]["exp_avg_sq"])
        assert torch.equal(
            kept.copies[q], q.detach().to(torch.bfloat16)
        )  # the copy: the weight rounded as autocast does
        assert kept.copies[q].stride() == q.stride()


def test_adams_l2_decay_differs_from_torchs_in_the_last_bit_at_most() -> None:
    """Adam's (not AdamW's) decay adds to the gradient inside the kernel, where the compiler may
    fuse the multiply-add that torch's kernel rounds in two steps."""
    net, plain, twin, kept = twins(torch.optim.Adam, lr=1e-3, weight_decay=0.05)
    step_both(net, plain, twin, kept, 6)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=2.4e-7, atol=1e-10)


def test_a_checkpoint_of_either_resumes_in_the_other() -> None:
    """The state dict is Adam's: a run saved with the copy resumes without it, and the other way round."""
    net, plain, twin, kept = twins(torch.optim.Adam, lr=1e-3)
    step_both(net, plain, twin, kept, 3)
    assert kept.state_dict()["param_groups"] == plain.state_dict()["param_groups"]
    saved_kept, saved_plain = (copy.deepcopy(o.state_dict()) for o in (kept, plain))  # as a checkpoint holds them
    plain.load_state_dict(saved_kept)
    kept.load_state_dict(saved_plain)
    step_both(net, plain, twin, kept, 3)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_weight_written_between_steps_reaches_the_next_forward_pass() -> None:
    """A callback's in-place write (or a loaded checkpoint) is seen through the weight's version counter."""
    net, _, twin, kept = twins(torch.optim.Adam)
    first = {name: c.clone() for name, c in kept.synced().items()}
    assert set(first) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with torch.no_grad():
        twin[2].bias.fill_(0.5)
    now = kept.synced()
    assert torch.equal(now["2.bias"], torch.full((256,), 0.5, dtype=torch.bfloat16))
    assert all(torch.equal(now[n], first[n]) for n in ("0.weight", "0.bias", "2.weight"))


def trainer(**options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False, **options)


@pytest.mark.parametrize(
    ("trainer_options", "optimizer", "compiled", "says"),
    [
        ({}, {}, False, None),
        ({"gradient_clip_val": 1.0}, {}, False, "trainer.gradient_clip_val is set"),
        ({"accumulate_grad_batches": 2}, {}, False, "accumulate_grad_batches is not 1"),
        ({"callbacks": [EMAWeightAveraging()]}, {}, False, "between steps (EMAWeightAveraging)"),
        ({"callbacks": [FreezeParameters(["0.bias"], 0.5)]}, {}, False, "between steps (FreezeParameters)"),
        ({}, {"amsgrad": True}, False, "Adam's amsgrad is set"),
        ({}, {}, True, "model.compile is set"),
        ({}, {"sgd": True}, False, "the optimizer is SGD, not torch's Adam or AdamW"),
    ],
)
def test_where_the_copy_does_not_apply_it_says_why(trainer_options, optimizer, compiled, says) -> None:
    net = small_net()
    if optimizer.pop("sgd", False):
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    else:
        opt = torch.optim.Adam(net.parameters(), **optimizer)
    reason = bf16_copy.why_not(trainer(**trainer_options), net, opt, compiled)
    assert reason == says if says is None else says in reason


def test_without_a_compiler_the_copy_steps_aside(tmp_path: Path) -> None:
    """No C++ compiler (and nothing cached): the kernel cannot be built, so the fit runs as before."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    code = "from cifarkit.fit import bf16_copy; print(bf16_copy.kernel_fault(2, 1))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("inductor could not build its kernel (")


def test_a_cache_others_may_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor loads compiled code from its cache: a cache folder others may write keeps the copy off
    and refuses model.compile, in one line that says how to fix it."""
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
    said = f"inductor's cache {shared} is not this user's alone"
    assert bf16_copy.kernel_fault.__wrapped__(2, 0).startswith(said)
    with pytest.raises(UserError, match="model.compile: " + re.escape(said) + ".*set TORCHINDUCTOR_CACHE_DIR"):
        compiled(small_net(), True)
    shared.chmod(0o755)
    assert inductor_cache_fault() is None


def fit(compose_cfg, image_folder: Path, tmp_path: Path, name: str, extra: list[str]) -> dict:
    # bf16-mixed named: trainer.precision=auto is fp32 on a CPU without bf16 hardware, where no copy is kept.
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + ["data.image_size=16", "trainer.max_epochs=2", "trainer.precision=bf16-mixed", *extra]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    train_job(cfg)
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_a_fit_learns_with_the_copy_what_it_learns_without(compose_cfg, image_folder, tmp_path, caplog) -> None:
    """The default recipe (Adam, bf16-mixed on the CPU) with the copy and without: the same losses,
    the same weights in the checkpoints (fp32, as ever), the same test metrics."""
    with caplog.at_level(logging.INFO, logger="cifarkit.fit.bf16_copy"):
        kept = fit(compose_cfg, image_folder, tmp_path, "kept", [])
    assert "Adam keeps a bf16 copy of the conv and linear weights" in caplog.text
    plain = fit(compose_cfg, image_folder, tmp_path, "plain", ["model.bf16_weight_copy=false"])
    assert kept["steps"] == plain["steps"] > 0
    for key in ("val/loss", "test/loss", "test/acc"):
        assert kept[key] == pytest.approx(plain[key], rel=1e-5), key
    a, b = (
        torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for n in ("kept", "plain")
    )
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_a_fit_where_it_does_not_apply_says_why_and_trains(compose_cfg, image_folder, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cifarkit.fit.bf16_copy"):
        metrics = fit(compose_cfg, image_folder, tmp_path, "accumulated", ["+trainer.accumulate_grad_batches=2"])
    assert "model.bf16_weight_copy: off for this fit, trainer.accumulate_grad_batches is not 1" in caplog.text
    assert metrics["status"] == "completed"
