"""The quality goals of distillation and cascades, read from a finished run (not timed).

For a run whose spec has a student and a cascade (``experiments/cheaper.yaml`` is one), prints:

- each student's recovered share of the ensemble's NLL gain over the best member (chosen on val,
  as the leaderboard chooses it): ``(nll(best member) - nll(student)) / (nll(best member) -
  nll(teacher))`` on test, with a 95% paired bootstrap interval over test samples (the same
  resamples for every row);
- each cascade's test accuracy against the full mean's, with the interval of the difference,
  and its expected cost against the full ensemble's.

    python benchmarks/quality_cheaper.py RUN_ID_OR_FOLDER [--registry DIR] [--json PATH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_BOOTSTRAP, SEED = 1000, 0


def per_sample_nll(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))


def interval(values: np.ndarray) -> list[float]:
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fusion_engine import RunFolder
    from fusion_engine.zoo import Registry, resolve_registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run id (in --registry) or a run folder")
    p.add_argument("--registry", default=None)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    folder = Path(args.run)
    if not folder.is_dir():
        with Registry(resolve_registry(args.registry), create=False) as reg:
            folder = reg.run_dir(args.run)
    run = RunFolder(folder)
    rows = {r["name"]: r for r in run.leaderboard["rows"]}
    y = run.labels("test")
    proba = run.probabilities("test")
    best = run.leaderboard["best_member"]
    rng = np.random.default_rng(SEED)
    resamples = rng.integers(0, len(y), size=(N_BOOTSTRAP, len(y)))
    nll = {name: per_sample_nll(p_, y) for name, p_ in proba.items()}
    correct = {name: (p_.argmax(axis=1) == y).astype(float) for name, p_ in proba.items()}
    out: dict = {"run": run.path.name, "best_member": best, "n_test": int(len(y)), "students": {}, "cascades": {}}

    for name, row in rows.items():
        if row["kind"] != "student":
            continue
        teacher = row["teacher"]
        gain = nll[best] - nll[teacher]
        recovered = nll[best] - nll[name]
        point = float(recovered.mean() / gain.mean())
        boot = np.array([recovered[i].mean() / gain[i].mean() for i in resamples])
        out["students"][name] = {
            "teacher": teacher, "nll_best_member": float(nll[best].mean()), "nll_teacher": float(nll[teacher].mean()),
            "nll_student": float(nll[name].mean()), "recovered_share": point, "recovered_share_ci": interval(boot),
            "accuracy": row["accuracy"], "accuracy_ci": [row["accuracy_lo"], row["accuracy_hi"]],
            "infer_ms_per_image": row["infer_ms_per_image"],
            "teacher_infer_ms_per_image": rows[teacher]["infer_ms_per_image"]}
        print(f"student {name} (teacher {teacher}): test NLL {nll[best].mean():.4f} (best member {best}) -> "
              f"{nll[name].mean():.4f}, teacher {nll[teacher].mean():.4f}; recovered {point:.2f} of the teacher's "
              f"NLL gain [{interval(boot)[0]:.2f}, {interval(boot)[1]:.2f}] (95% bootstrap); accuracy "
              f"{row['accuracy']:.4f} [{row['accuracy_lo']:.4f}, {row['accuracy_hi']:.4f}]; "
              f"{row['infer_ms_per_image']:.3g} ms/image against the teacher's {rows[teacher]['infer_ms_per_image']:.3g}")

    full = "mean" if "mean" in rows else None
    for name, row in rows.items():
        if row["kind"] != "fuser" or run.fusers.get(name, {}).get("fuser") != "cascade" or full is None:
            continue
        diff = correct[name] - correct[full]
        boot = np.array([diff[i].mean() for i in resamples])
        params = run.fusers[name].get("params", {})
        out["cascades"][name] = {
            "accuracy": row["accuracy"], "accuracy_full_mean": rows[full]["accuracy"],
            "difference": float(diff.mean()), "difference_ci": interval(boot),
            "max_accuracy_drop": params.get("max_accuracy_drop"), "budget": params.get("budget"),
            "infer_ms_per_image": row["infer_ms_per_image"], "full_infer_ms_per_image": rows[full]["infer_ms_per_image"],
            "test_usage": run.fusers[name].get("test_usage")}
        print(f"cascade {name}: test accuracy {row['accuracy']:.4f} against {full}'s {rows[full]['accuracy']:.4f}: "
              f"difference {diff.mean():+.4f} [{interval(boot)[0]:+.4f}, {interval(boot)[1]:+.4f}] (95% paired "
              f"bootstrap; target: a drop of at most {params.get('max_accuracy_drop')}); expected "
              f"{row['infer_ms_per_image']:.3g} ms/image against the full ensemble's "
              f"{rows[full]['infer_ms_per_image']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
