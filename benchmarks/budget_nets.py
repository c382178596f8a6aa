"""What a time budget buys with each of ``experiment=cpu10``'s candidate nets, and which one the budget chose.

    python benchmarks/budget_nets.py ROOT [--budgets 150 600] [--narrowest K | --nets W ...] [--logs DIR] [-- OVERRIDES]

ROOT is an image-folder tree (ROOT/train/<class>/*, ROOT/test/<class>/*). For each budget it runs
``python train.py experiment=cpu10 data=image_folder data.root=ROOT budget_s=B``, which chooses
among the preset's ``budget_nets``, then every other candidate with its net given on the command
line and the same budget: each run times its own first steps and fixes its step count from them,
as the rule's run does, so every row trains its share of the same budget. Runs go one after
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

from cifarkit.run.budget import net_options, required_epochs
from results import ROOT, add_argument, save


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


def row(metrics: dict[str, Any], net: dict[str, Any], chosen: bool, steps_per_epoch: int) -> dict[str, Any]:
    """A candidate's figures from its budget run: the rate its first steps measured and the one after them."""
    decided = metrics["budget"]
    return {
        "net": net,
        "chosen": chosen,
        "planned_steps": decided["steps"],
        "steps": metrics["steps"],
        "epochs": round(metrics["steps"] / steps_per_epoch, 2),
        "seconds_per_step": decided["seconds_per_step"],
        "run_seconds_per_step": decided.get("run_seconds_per_step"),
        "stopped_at_budget": decided.get("stopped_at_budget"),
        "train_seconds": round(metrics["train/seconds"], 1),
        "test_acc": metrics["test/acc"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 600], help="seconds of training (default: 150 600)")
    p.add_argument("--logs", default="logs/budget_nets", help="where the runs write (default: logs/budget_nets)")
    p.add_argument("--narrowest", type=int, help="train only this many of the narrowest candidates (default: all)")
    p.add_argument(
        "--nets", nargs="+", metavar="W", help="train only these candidates and the rule's, e.g. 48,96,192 64,128,256"
    )
    p.add_argument("extra", nargs="*", help="more overrides for every run, after --")
    add_argument(p)
    args = p.parse_args()
    logs = Path(args.logs).resolve()
    wanted = [[int(w) for w in n.split(",")] for n in args.nets or []]
    for budget in args.budgets:
        ruled = run(args.root, budget, None, logs, args.extra, "rule")
        chosen = ruled["budget"]["net"]
        per_epoch = ruled["budget"]["candidates"][0]["steps_per_epoch"]  # the same data and batch for every net
        table = []
        for net in [n for n in ladder()[: args.narrowest] if not wanted or n["widths"] in wanted or n == chosen]:
            metrics = ruled if net == chosen else run(args.root, budget, net, logs, args.extra, widths(net))
            table.append({"budget_s": budget, **row(metrics, net, net == chosen, per_epoch)})
        print(
            "| budget | widths | steps (epochs) | s/step: first steps, after | training s (of the budget) | test acc |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for r in table:
            name = widths(r["net"], "/") + (" (chosen)" if r["chosen"] else "")
            share = r["train_seconds"] / r["budget_s"]
            print(
                f"| {r['budget_s']} s | {name} | {r['steps']:,} ({r['epochs']:.1f}) | {r['seconds_per_step']:.3f}, "
                f"{r['run_seconds_per_step'] or 0:.3f} | {r['train_seconds']:.0f} ({share:.0%}) "
                f"| {r['test_acc']:.2%} |"
            )
        need = required_epochs(ruled["budget"]["candidates"])  # also for a reused run made before it was recorded
        print(f"The rule asks for {need:g} epochs here.")
        save(args.results, f"budget-nets-{budget}s", {"root": args.root, "required_epochs": need, "runs": table})


if __name__ == "__main__":
    main()
