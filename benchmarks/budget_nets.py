"""What a time budget buys with each of ``experiment=cpu10``'s candidate nets, and which one the budget chose.

    python benchmarks/budget_nets.py ROOT [--budgets 150 600] [--rates FILE] [--narrowest K] [--logs DIR] [-- OVERRIDES]

ROOT is an image-folder tree (ROOT/train/<class>/*, ROOT/test/<class>/*). For each budget it runs
``python train.py experiment=cpu10 data=image_folder data.root=ROOT budget_s=B``, which chooses
among the preset's ``budget_nets``, then every other candidate with its net given on the command
line. A candidate the rule probed trains for the steps that probe's rate buys
(``trainer.max_steps``), so every row comes from one measurement of the machine; one it did not
probe (wider than the first that fell short) takes its rate from ``--rates`` (an earlier results
file of this machine) or, without it, is sized by a budget probe of its own. Runs go one after
another (at once they would share the cores).
Prints a markdown table and saves docs/results/budget-nets-<B>s-<machine>.json (benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cifarkit.run.budget import net_options, required_epochs, steps_for
from results import ROOT, add_argument, save

RATE = ("seconds_per_step", "warmup_extra_s", "steps_per_epoch")


def ladder() -> list[dict[str, Any]]:
    """The candidates ``experiment=cpu10`` offers its budget, narrowest first."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "experiment" / "cpu10.yaml").budget_nets)


def run(root: str, budget: int, net: dict[str, Any] | None, logs: Path, extra: list[str], name: str) -> dict[str, Any]:
    """One run of ``experiment=cpu10`` with ``budget_s=budget`` (``net``: given on the command line, and
    ``extra`` overrides) in ``logs/<budget>s/<name>``; its metrics.json. A run that completed there
    before is read, not repeated, so an interrupted benchmark continues where it stopped."""
    log_dir = logs / f"{budget}s" / name
    done = sorted(log_dir.glob("train/runs/*/metrics.json"))
    if done and (metrics := json.loads(done[-1].read_text())).get("status") == "completed":
        print(f"reusing {done[-1]}", file=sys.stderr)
        return metrics
    args = ["experiment=cpu10", "data=image_folder", f"data.root={root}", f"budget_s={budget}"]
    given = net_options(net).split() if net else []
    command = [sys.executable, "train.py", *args, f"paths.log_dir={log_dir}", *given, *extra]
    print(" ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(sorted(log_dir.glob("train/runs/*/metrics.json"))[-1].read_text())


def widths(net: dict[str, Any], sep: str = "-") -> str:
    return sep.join(map(str, net["widths"]))


def recorded_rates(path: str | None) -> dict[str, dict[str, float]]:
    """Each net's rate (``seconds_per_step``, ``warmup_extra_s``, ``steps_per_epoch``) from an earlier results file."""
    if not path:
        return {}
    runs = json.loads(Path(path).read_text())["figures"]["runs"]
    return {net_options(r["net"]): {k: r[k] for k in RATE} for r in runs}


def row(
    metrics: dict[str, Any], net: dict[str, Any], chosen: bool, rate: dict[str, Any] | None, steps_from: str
) -> dict[str, Any]:
    """A candidate's figures: its rate from its own probe (``rate``: from the rule's probe or a results file)."""
    rate = rate or metrics["budget"]
    return {
        "net": net,
        "chosen": chosen,
        "steps_from": steps_from,
        "steps": metrics["steps"],
        "epochs": round(metrics["steps"] / rate["steps_per_epoch"], 2),
        **{k: rate[k] for k in RATE},
        "run_seconds_per_step": round(metrics["train/seconds"] / metrics["steps"], 4),
        "train_seconds": round(metrics["train/seconds"], 1),
        "test_acc": metrics["test/acc"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 600], help="seconds of training (default: 150 600)")
    p.add_argument("--rates", help="a budget-nets results file of this machine: the other candidates' rates")
    p.add_argument("--logs", default="logs/budget_nets", help="where the runs write (default: logs/budget_nets)")
    p.add_argument("--narrowest", type=int, help="train only this many of the narrowest candidates (default: all)")
    p.add_argument("extra", nargs="*", help="more overrides for every run, after --")
    add_argument(p)
    args = p.parse_args()
    logs, recorded = Path(args.logs).resolve(), recorded_rates(args.rates)
    for budget in args.budgets:
        ruled = run(args.root, budget, None, logs, args.extra, "rule")
        chosen = ruled["budget"]["net"]
        probed = {net_options(c["net"]): c for c in ruled["budget"]["candidates"]}
        table = []
        for net in ladder()[: args.narrowest]:
            key, rate, steps_from = net_options(net), None, "its probe"
            if net == chosen:
                metrics = ruled
            elif key in probed or recorded:
                rate, steps_from = (
                    (probed[key], "the rule's probe") if key in probed else (recorded[key], "a recorded rate")
                )
                steps = steps_for(budget, rate["seconds_per_step"], rate["warmup_extra_s"])
                given = [f"trainer.max_steps={steps}", "trainer.max_epochs=-1", *args.extra]
                metrics = run(args.root, budget, net, logs, given, f"{widths(net)}-{steps}-steps")
            else:
                metrics = run(args.root, budget, net, logs, args.extra, widths(net))
            table.append({"budget_s": budget, **row(metrics, net, net == chosen, rate, steps_from)})
        print("| budget | widths | steps (epochs) | s/step: probe, run | training s (of the budget) | test accuracy |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in table:
            name = widths(r["net"], "/") + (" (chosen)" if r["chosen"] else "")
            share = r["train_seconds"] / r["budget_s"]
            print(
                f"| {r['budget_s']} s | {name} | {r['steps']:,} ({r['epochs']:.1f}) | {r['seconds_per_step']:.3f}, "
                f"{r['run_seconds_per_step']:.3f} | {r['train_seconds']:.0f} ({share:.0%}) "
                f"| {r['test_acc']:.2%} |"
            )
        need = required_epochs(ruled["budget"]["candidates"])  # also for a reused run made before it was recorded
        print(f"The rule asks for {need:g} epochs here.")
        save(args.results, f"budget-nets-{budget}s", {"root": args.root, "required_epochs": need, "runs": table})


if __name__ == "__main__":
    main()
