"""One experiment, end to end, along the data path:

    spec -> data -> members -> calibrate -> fusers -> leaderboard -> run folder

Each arrow is one stage with typed inputs and outputs: :func:`fusion_engine.resolve.prepare` and
:func:`fusion_engine.preflight.preflight` (before any run folder exists), :func:`fusion_engine.data.run_data`, :class:`fusion_engine.members.MemberStage`,
:func:`fusion_engine.members.calibrate_member` (per member, as each is ready), :func:`fusion_engine.fusion.fit_fusers`,
:func:`fusion_engine.leaderboard.build_leaderboard`, and :class:`fusion_engine.runfolder.RunFolder`,
which writes everything. This module only strings them together and keeps the run's summary (``run.json``).
Trackers hear the lifecycle hooks through :class:`fusion_engine.tracking.RunTrackers`, which contains their failures.

The evaluation protocol: the data are split once; members train on train, choose their best
epoch on val, and predict val and test once; fusers see member logits only, are fitted on val
and scored on val out-of-fold; test is touched only to score, and every row is scored on the
same test samples.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import RUN_LOG_ONLY, RUN_STARTED, KeptWarnings
from .executors import LazyExecutor
from .fusion import fit_fusers
from .leaderboard import Row, build_leaderboard, network_row, print_leaderboard
from .members import MemberResult, MemberStage, calibrate_member
from .preflight import Preflight, preflight
from .plugins import Plugins
from .provenance import library_versions
from .records import SCORED_SPLITS
from .runfolder import RunFolder
from .resolve import ResolvedSpec, prepare
from .tracking import RunTrackers
from .zoo import Registry, resolve_registry

log = logging.getLogger("fusion_engine")

@dataclass
class RunContext:
    """What lifecycle hooks see of a run."""

    spec: ResolvedSpec
    run_id: str
    run_dir: Path
    registry: Path
    plugins: Plugins
    class_names: list[str] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def note(self, section: str, **fields: Any) -> None:
        """Record ``fields`` (JSON-able) in ``run.json`` under ``notes.<section>``, adding to or replacing its fields."""
        self.notes.setdefault(section, {}).update(fields)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    leaderboard: Any  # pandas.DataFrame
    members: dict[str, MemberResult]


def run_experiment(spec_path: str | os.PathLike, *, registry: str | os.PathLike | None = None,
                   device: str | None = None, quiet: bool = False, executor: dict | None = None,
                   retrain: tuple[str, ...] = ()) -> RunResult:
    """Run the experiment a spec file describes and write its run folder.

    ``executor`` (``{"name": "ray", "params": {"address": "auto"}}``) overrides the spec's;
    ``retrain`` names members to train again though the zoo has them (``("all",)``: every one).
    Everything that can be checked without training is checked before the run folder is made
    (:func:`fusion_engine.preflight.preflight`).
    """
    from rich.console import Console

    resolved, plugins = prepare(spec_path, executor=executor)
    spec = resolved.spec
    device = device or spec.device
    registry_dir = resolve_registry(registry)
    checked = preflight(resolved, registry=registry_dir, retrain=tuple(retrain))
    console = Console(stderr=True, quiet=quiet)
    with LazyExecutor(resolved.executor) as lazy_executor:
        if device == "cuda" and lazy_executor.local:
            from .training import resolve_device

            resolve_device(device)  # no CUDA is bad input: say so before any folder is made
        run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{spec.name}-{secrets.token_hex(2)}"
        with Registry(registry_dir) as reg:
            folder = RunFolder.create(reg.run_dir(run_id))
            with reg.run_lock(run_id):
                ctx = RunContext(resolved, run_id, folder.path, reg.root, plugins)
                run = _Run(ctx, reg, folder, Path(spec_path), device, quiet, lazy_executor, console)
                return run.execute(checked, tuple(retrain))


class _Run:
    """One run's stages, its summary (``run.json``) and its log."""

    def __init__(self, ctx: RunContext, reg: Registry, folder: RunFolder, spec_path: Path, device: str, quiet: bool,
                 executor: LazyExecutor, console):
        self.ctx, self.reg, self.folder, self.device, self.quiet, self.executor = ctx, reg, folder, device, quiet, executor
        self.resolved = ctx.spec
        self.console = console
        self.warnings = KeptWarnings(keep_records=False)
        self.summary: dict[str, Any] = {
            "run_id": ctx.run_id, "experiment": self.resolved.spec.name, "spec_file": str(spec_path.resolve()),
            "status": "running", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device, "executor": executor.name, "registry": str(reg.root.resolve()),
            "versions": library_versions(), "members": {}, "warnings": self.warnings.messages, "notes": ctx.notes,
        }

    def execute(self, checked: Preflight, retrain: tuple[str, ...]) -> RunResult:
        spec = self.resolved.spec
        started = time.perf_counter()
        with ExitStack() as stack:
            handler = self.folder.log_handler()
            stack.callback(handler.close)
            for h in (handler, self.warnings):
                for record in checked.warnings:  # found before the folder existed; stderr has them already
                    h.handle(record)
                log.addHandler(h)
                stack.callback(log.removeHandler, h)
            stack.callback(log.setLevel, log.level)
            log.setLevel(logging.INFO)
            if trackers := RunTrackers(self.resolved.trackers):
                self.ctx.plugins.pm.register(trackers, name=f"trackers:{self.ctx.run_id}")
                stack.callback(self.ctx.plugins.pm.unregister, trackers)
            log.info("run %s: %s", self.ctx.run_id, self.folder.path, extra={RUN_STARTED: True})
            self.reg.run_started(self.ctx.run_id, experiment=spec.name, spec_file=self.summary["spec_file"],
                                 n_members=len(spec.members), n_fusers=len(spec.fusers))
            try:
                result = self._stages(checked, retrain)
                seconds = round(time.perf_counter() - started, 3)
                self.summary.update(status="complete", seconds=seconds, fusers=[f.name for f in spec.fusers])
                self.folder.write_summary(self.summary)
                self.reg.run_finished(self.ctx.run_id, status="complete", seconds=seconds)
            except BaseException as exc:
                self._failed(exc, round(time.perf_counter() - started, 3))
                self._finished()
                raise
            log.info("run %s complete in %.1fs", self.ctx.run_id, seconds)
            self._plots_and_report()
            self._finished()
            return result

    def _stages(self, checked: Preflight, retrain: tuple[str, ...]) -> RunResult:
        """The data path; calibrate runs for each member as it is ready (``_member_ready``)."""
        from .data import run_data

        ctx, resolved, folder = self.ctx, self.resolved, self.folder
        spec = resolved.spec
        folder.write_spec(resolved.resolved_dict())
        folder.write_summary(self.summary)
        ctx.plugins.hook.on_run_start(run=ctx)

        self.console.log(f"fingerprinting dataset [bold]{spec.data.dataset}[/]")
        data = run_data(checked.dataset, checked.indices, cache_dir=self.reg.image_cache_dir,
                        fingerprint=checked.fingerprint, data_spec=spec.data)
        ctx.class_names, ctx.split_sizes = data.class_names, data.split_sizes
        self.summary["data"] = {"split_sizes": data.split_sizes, "classes": data.class_names,
                               "fingerprint": data.fingerprint, "split_sha256": data.split}
        folder.write_split(data.class_names, data.ids, data.labels)
        self.data = data

        members = MemberStage(resolved, checked, self.reg, data, self.executor, run_id=ctx.run_id, device=self.device,
                              quiet=self.quiet, console=self.console, retrain=retrain, on_ready=self._member_ready,
                              on_failed=self._member_failed).run()

        self.console.log(f"fitting {len(spec.fusers)} fuser{'' if len(spec.fusers) == 1 else 's'} on val")
        n_scored = sum(len(data.labels[s]) for s in SCORED_SPLITS)
        given = {m.name: m.infer_ms_per_image for m in spec.members}
        rows = [network_row(m, n_scored, given[m.name]) for m in members.values()]
        fitted = []
        for fuser in fit_fusers(resolved.bound_fusers, {n: m.logits for n, m in members.items()}, data.labels,
                                spec.seed, costs={r.name: r.extra["infer_ms_per_image"] for r in rows}):
            folder.write_fuser(fuser.name, fuser.description())
            fitted.append(fuser)
        students = self._students(checked, members, fitted, retrain)
        self.executor.close()  # a Ray instance it started is stopped before anything forks to draw plots

        rows += [Row(name=f.name, kind="fuser", members=f.members, proba=f.proba, weights=f.weights,
                     consulted=f.consulted,
                     extra={"fit_seconds": f.fit_seconds, "predict_ms_per_image": f.predict_ms_per_image})
                 for f in fitted]
        rows += [network_row(s, n_scored) for s in students.values()]
        metrics = [p.record for p in ctx.plugins.catalog().records["metric"].values()]
        leaderboard = build_leaderboard(rows, data.labels, metrics, rank_by=spec.rank_by, seed=spec.seed)
        folder.write_leaderboard(leaderboard, meta={
            "run_id": ctx.run_id, "experiment": spec.name, "ranked_by": leaderboard.attrs.get("ranked_by", spec.rank_by),
            "scored_on": "test", "split_sizes": data.split_sizes})
        folder.write_predictions(data.ids, data.labels, rows)
        if not self.quiet:
            print_leaderboard(leaderboard, title=f"{spec.name}: scored on {data.split_sizes['test']} test samples")
        ctx.plugins.hook.on_run_end(run=ctx, leaderboard=leaderboard)
        return RunResult(ctx.run_id, folder.path, leaderboard, members)

    def _students(self, checked: Preflight, members: dict[str, MemberResult], fitted: list,
                  retrain: tuple[str, ...]) -> dict[str, MemberResult]:
        """The student stage: each student distilled from its teacher's probabilities on train."""
        from .students import StudentStage, teachers

        spec = self.resolved.spec
        if not spec.students:
            return {}
        self.console.log(f"distilling {len(spec.students)} student{'' if len(spec.students) == 1 else 's'}")
        taught = teachers(spec, members, {f.name: f for f in fitted})
        return StudentStage(self.resolved, checked, self.reg, self.data, self.executor, taught, run_id=self.ctx.run_id,
                            device=self.device, quiet=self.quiet, console=self.console, retrain=retrain,
                            on_ready=self._student_ready, on_failed=self._member_failed).run()

    # -- the summary --------------------------------------------------------------------------------
    def _student_ready(self, index: int, student: MemberResult) -> MemberResult:
        """A student is trained (or reused): its run-folder files, the summary and the index."""
        self.folder.write_member(student, str(self.reg.member_dir(student.key).relative_to(self.reg.root)))
        self._note_member(student.name, {"key": student.key, "action": student.action, "source": "student",
                                         "teacher": student.card.teacher.name})
        self.reg.run_member(self.ctx.run_id, student.name, student.key, student.action)
        log.info("student %s: %s, key %s, best epoch %s", student.name, student.action, student.key, student.best_epoch)
        return student

    def _member_ready(self, index: int, member: MemberResult) -> MemberResult:
        """A member's outputs are ready: the calibrate stage for it, its run-folder files, the
        summary, the index, and the hook (which sees the logits the fusers will); the member as the
        run keeps it."""
        from .evaluation import accuracy

        member = calibrate_member(member, self.resolved.spec.members[index], self.data.labels["val"])
        self.folder.write_member(member, str(self.reg.member_dir(member.key).relative_to(self.reg.root)))
        noted = {"key": member.key, "action": member.action,
                 "source": self.resolved.spec.members[index].source}
        if member.resumed_from_epoch:
            noted["resumed_from_epoch"] = member.resumed_from_epoch
        if member.action in ("trained", "predicted"):
            noted["executor"] = self.executor.name
        self._note_member(member.name, noted)
        self.reg.run_member(self.ctx.run_id, member.name, member.key, member.action)
        log.info("member %s: %s, key %s, best epoch %s, val accuracy %.4f", member.name, member.action, member.key,
                 member.best_epoch, accuracy(self.data.labels["val"], member.logits["val"]))
        self.ctx.plugins.hook.on_member_ready(run=self.ctx, member=member)
        return member

    def _member_failed(self, name: str, key: str, error: str) -> None:
        self._note_member(name, {"key": key, "action": "failed", "error": error, "executor": self.executor.name})

    def _note_member(self, name: str, noted: dict) -> None:
        members = self.summary["members"]
        members[name] = noted
        actions = {action: [n for n, m in members.items() if m["action"] == action]
                   for action in ("trained", "predicted", "read", "reused", "failed")}
        self.summary.update(trained=actions["trained"], predicted=actions["trained"] + actions["predicted"],
                            read=actions["read"], reused=actions["reused"], failed=actions["failed"])
        self.folder.write_summary(self.summary)

    def _failed(self, exc: BaseException, seconds: float) -> None:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        self.summary.update(status=status, error=f"{type(exc).__name__}: {exc}", seconds=seconds)
        self.folder.write_summary(self.summary)
        # The CLI reports the error itself, once; this line is for run.log.
        log.error("run %s %s: %s", self.ctx.run_id, status, self.summary["error"], extra={RUN_LOG_ONLY: True})
        try:
            self.reg.run_finished(self.ctx.run_id, status=status, seconds=seconds, error=self.summary["error"])
        except Exception as index_exc:  # the run's own error is the one to report
            log.error("could not record the run's end in the registry index: %s", index_exc)

    def _finished(self) -> None:
        """``on_run_finished`` (its failure a warning: the outcome is settled), then the summary again."""
        try:
            self.ctx.plugins.hook.on_run_finished(run=self.ctx, status=self.summary["status"])
        except Exception as exc:
            log.warning("a plugin's on_run_finished failed: %s", " ".join(f"{type(exc).__name__}: {exc}".split()))
        self.folder.write_summary(self.summary)

    def _plots_and_report(self) -> None:
        """Plots and report.html, drawn from the finished run folder. A failure here is a warning:
        the run's results are already written, and ``fusion-engine report`` can draw them again."""
        from .plots import write_plots
        from .report import write_report

        run_id = self.ctx.run_id
        try:
            report = write_report(self.folder.path, write_plots(self.folder.path))
            self.console.log(f"report: {report}")
        except Exception as exc:
            log.warning("could not draw the plots and report of %s: %s: %s (retry with: fusion-engine report %s)",
                        run_id, type(exc).__name__, exc, run_id)
