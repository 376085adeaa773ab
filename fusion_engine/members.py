"""The member stage of a run: every member's val and test outputs, from the zoo where it is
stored, else trained by the executor and stored there.

Each member the spec trains has a zoo key (:func:`plan`); members alike in all but their names
share one and are trained once. The stage holds each key's lock from the moment it decides about
the member until the member is stored, so two runs never train one member twice: members whose
lock is free are settled first, all together (in parallel where the executor can); then, one at a
time, those another run is busy with: by the time their lock is ours, that run has usually
stored them. Locks are taken in key order and, while waiting, the stage holds no other, so two
runs never wait for each other in a cycle.

A member that fails does not stop the others; the stage then raises :class:`MembersFailed`
naming it, and a re-run trains only what failed. A member named by ``zoo:`` is read from the
zoo (the preflight checks chose it, trained on this run's data and split). ``--retrain`` names
members trained again even when the zoo has them; the new ones replace the stored ones.
"""

from __future__ import annotations

import logging
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .data import RunData
from .errors import RUN_LOG_ONLY, FusionEngineError, SpecError
from .evaluation import accuracy
from .executors import FittedMember, JobOutcome, LazyExecutor, MemberJob
from .records import SCORED_SPLITS, SPLITS, InputConfig
from .preflight import Preflight
from .provenance import engine_version, member_code, params_for_key
from .resolve import ResolvedSpec
from .spec import MemberSpec
from .zoo import Busy, CorruptArtifact, MemberCard, Registry, StoredMember, ZooError, key_material, member_key, short
from .zoo.artifacts import IDS_FILE, OUTPUTS_FILE, WEIGHTS_FILE

log = logging.getLogger("fusion_engine")


@dataclass
class MemberResult:
    """A member and its outputs on val and test, trained in this run or reused from the zoo.

    ``card`` is its zoo card (:class:`~fusion_engine.zoo.MemberCard`); ``logits`` its outputs,
    divided by ``temperature`` once the calibrate stage has fitted one.
    """

    name: str
    card: MemberCard
    logits: dict[str, np.ndarray]
    #: "trained" (and predicted) in this run, "predicted" (run from its weights), "read" (from its predictions
    #: file) or "reused" from the zoo
    action: str = "trained"
    resumed_from_epoch: int | None = None  # the checkpointed epoch its training resumed after
    temperature: float | None = None  # set when its logits were temperature-scaled

    @property
    def key(self) -> str | None:
        return self.card.key

    @property
    def backbone(self) -> str:
        return self.card.backbone

    @property
    def input(self) -> InputConfig | None:
        """What its network takes; None for a member read from predictions (it has none)."""
        inp = self.card.input
        if inp is None:
            return None
        return InputConfig(size=inp.size, mean=tuple(inp.mean), std=tuple(inp.std), in_chans=inp.in_chans,
                           interpolation=inp.interpolation, crop_pct=inp.crop_pct, crop_mode=inp.crop_mode)

    @property
    def source(self) -> str:
        return self.card.source

    @property
    def history(self) -> list[dict]:
        return self.card.history

    @property
    def best_epoch(self) -> int | None:
        return self.card.best_epoch

    @property
    def n_params(self) -> int | None:
        return self.card.n_params

    @property
    def train_seconds(self) -> float:
        return float(self.card.timings.train_seconds or 0.0)

    @property
    def predict_seconds(self) -> float:
        return float(self.card.timings.predict_seconds or 0.0)


class MembersFailed(FusionEngineError):
    """Members whose training failed; the rest of the run's members are in the zoo. The run
    failed rather than the input being bad: exit status 1."""

    exit_code = 1

    def __init__(self, failures: dict[str, str], *, stored: int, total: int):
        self.failures = failures
        detail = "; ".join(f"{name}: {error}" if not error.startswith(f"member {name}") else error
                           for name, error in failures.items())
        what = "member" if total == 1 else "members"
        others = "the other member is" if stored == 1 else f"the other {stored} are"
        rest = f"; {others} ready in the zoo, so a re-run trains only {', '.join(failures)}" if stored else ""
        super().__init__(f"{len(failures)} of {total} {what} failed: {detail}{rest}")


@dataclass
class PlannedMember:
    """A member the spec makes (trains, runs from weights, or reads from predictions): where it
    is in the spec, its source, and the key it has in the zoo."""

    index: int
    name: str
    source: str  # "trained", "weights" or "predictions"
    key: str
    material: dict
    seed: int | None


def plan(resolved: ResolvedSpec, data: RunData, checked: Preflight) -> list[PlannedMember]:
    """The zoo key of every member the spec makes (members given by ``zoo:`` have one already);
    a trained member's key names the pretrained weights it starts from when they come from a
    hub (``checked.pretrained``)."""
    spec = resolved.spec
    planned = []
    for i, (mspec, bound) in enumerate(zip(spec.members, resolved.members)):
        source = mspec.source
        if source == "zoo":
            continue
        common = dict(fingerprint=data.fingerprint, split=data.split)
        if source == "predictions":
            material = key_material(backbone=None, params={}, train=None, seed=None, image_size=None, mean=None,
                                    std=None, code={"engine": engine_version()}, **common,
                                    source={"predictions": {**checked.origins[i].for_key(), "kind": mspec.kind}})
            seed = None
        else:
            seed = None if source == "weights" else (spec.seed if mspec.seed is None else mspec.seed)
            material = key_material(
                backbone=bound.record.name,
                params=params_for_key(bound.params.model_dump(mode="json"), resolved.base_dir),
                train=None if source == "weights" else train_config(mspec.train), seed=seed,
                image_size=spec.data.image_size, mean=spec.data.mean, std=spec.data.std,
                code=member_code(bound.provided), **common,
                weights=checked.pretrained.get(i) if source == "trained" else None,
                source={"weights": checked.origins[i].for_key()} if source == "weights" else None,
            )
        planned.append(PlannedMember(i, mspec.name, source, member_key(material), material, seed))
    return planned


def train_config(train) -> dict:
    """The training config as it enters a key: ``lr`` and ``weight_decay`` resolved, so leaving
    them to their defaults and writing the defaults out are the same member."""
    data = train.model_dump(mode="json")
    data["lr"] = train.resolved_lr
    data["weight_decay"] = train.resolved_weight_decay
    return data


class MemberStage:
    """Settles every member of a spec (see the module docstring).

    A subclass settles other networks the same way (:class:`fusion_engine.students.StudentStage`):
    it sets ``items`` and ``bound`` (their spec entries and bound backbones), ``inputs``,
    ``origins`` and ``pretrained`` by index, and overrides :meth:`_plan`.

    ``on_ready(index, member) -> member`` is called for each member as its outputs are ready, in
    the order they become ready, and gives back the member as the run keeps it (the run's
    calibrate stage gives it back temperature-scaled); ``on_failed(name, key, error)`` is called
    for each one that fails.
    """

    kind = "member"  # what it settles, in its messages

    def __init__(self, resolved: ResolvedSpec, checked: Preflight, reg: Registry, data: RunData,
                 executor: LazyExecutor, *, run_id: str, device: str, quiet: bool, console, retrain: tuple[str, ...] = (),
                 on_ready: Callable[[int, MemberResult], MemberResult],
                 on_failed: Callable[[str, str, str], None]):
        self.resolved, self.spec, self.checked = resolved, resolved.spec, checked
        self.reg, self.data, self.executor = reg, data, executor
        self.retrain = set(retrain)
        self.run_id, self.device, self.quiet, self.console = run_id, device, quiet, console
        self._on_ready, self._on_failed = on_ready, on_failed
        self.results: dict[str, MemberResult] = {}
        self.failures: dict[str, str] = {}
        # what this stage settles: the spec's members (a subclass settles its students)
        self.items, self.bound = self.spec.members, self.resolved.members
        self.inputs, self.origins, self.references = checked.inputs, checked.origins, checked.references
        self.pretrained = checked.pretrained  # by index: the hub weights a network starts from (its key names them)
        #: members a student's teacher uses: they predict train too (stored with val and test)
        self.need_train = {n for s in self.spec.students for n in self.spec.teacher_members(s)}
        self._completing: dict[str, StoredMember] = {}  # key -> a stored member being predicted on train

    def run(self, only: set[str] | None = None) -> dict[str, MemberResult]:
        """Every member's result (of the members named in ``only``, when given), in the spec's
        order; :class:`MembersFailed` when any failed."""
        wanted = [m.name for m in self.items if only is None or m.name in only]
        for i, entry in self.references.items():
            if self.spec.members[i].name in wanted:
                # (a teacher's member has outputs on train: the preflight checks saw to it)
                self._ready(i, referenced_member(self.resolved, i, entry, self.reg, self.data, self.console))
        planned = [p for p in self._plan() if p.name in wanted]
        by_key: dict[str, list[PlannedMember]] = {}
        for p in planned:
            by_key.setdefault(p.key, []).append(p)
        locks = {key: _Held(self.reg, key, members[0].name, self.console) for key, members in by_key.items()}
        held: dict[str, _Held] = {}
        try:
            for key in sorted(by_key):
                if locks[key].acquire(wait=False):
                    held[key] = locks[key]
            self._settle(sorted((p for key in held for p in by_key[key]), key=lambda p: p.index), held)
            for key in sorted(set(by_key) - set(held)):
                locks[key].acquire(wait=True)
                held[key] = locks[key]
                self._settle(by_key[key], {key: locks[key]})
        finally:
            for lock in held.values():
                lock.release()
        if self.failures:
            raise MembersFailed(self.failures, stored=len(self.results), total=len(wanted))
        return {name: self.results[name] for name in wanted}

    def _plan(self) -> list[PlannedMember]:
        return plan(self.resolved, self.data, self.checked)

    # -- callbacks ------------------------------------------------------------------------------------
    def _ready(self, index: int, member: MemberResult) -> None:
        self.results[member.name] = self._on_ready(index, member)

    def _fail(self, name: str, key: str, outcome: JobOutcome) -> None:
        self.failures[name] = outcome.error
        log.error("%s %s failed after %.1fs: %s\n%s", self.kind, name, outcome.seconds, outcome.error,
                  outcome.traceback or "", extra={RUN_LOG_ONLY: True})
        self.console.log(f"[red]{self.kind} {name} failed[/]: {outcome.error}")
        self._on_failed(name, key, outcome.error)

    # -- settling members whose locks the run holds -----------------------------------------------------
    def _settle(self, members: list[PlannedMember], held: dict[str, "_Held"]) -> None:
        """Reuse or train ``members``; the run holds their keys' locks in ``held``."""
        jobs: list[tuple[PlannedMember, MemberJob]] = []
        for p in members:
            if "all" in self.retrain or p.name in self.retrain:
                self.reg.checkpoint(p.key).clear()  # retrained from scratch, as asked
                log.info("retraining %s, as --retrain asks", p.name)
                stored = None
            else:
                stored = stored_member(self.reg, p.key, p.name, self.data)
            if stored is not None and p.name in self.need_train and "train" not in stored.outputs.logits \
                    and p.source != "predictions":
                self._completing[p.key] = stored  # stored before a student needed it: predict train once
                log.info("%s is stored without outputs on train; predicting them once", p.name)
            elif stored is not None:
                self.console.log(f"reused [bold]{p.name}[/] from the zoo (key {short(p.key)})")
                self._ready(p.index, from_stored(p.name, stored, action="reused"))
                continue
            if p.source == "predictions":  # read in this process: nothing to run
                card = self._store_predictions(p)
                held[p.key].release()
                self.console.log(f"read [bold]{p.name}[/] from {self.checked.origins[p.index].path.name}")
                self._ready(p.index, MemberResult(p.name, card, dict(self.checked.predictions[p.index]), action="read"))
                continue
            jobs.append((p, self._job(p)))  # builds nothing: the network is built where it trains
        same_key: dict[str, list[tuple[PlannedMember, MemberJob]]] = {}
        for p, job in jobs:  # members alike in all but their names share a key: trained once
            same_key.setdefault(p.key, []).append((p, job))
        for key, group in same_key.items():  # train too when a student's teacher needs it (any of the group's names)
            if key not in self._completing and any(p.name in self.need_train for p, _ in group):
                group[0][1].splits = SPLITS
        for key, lock in held.items():
            if key not in same_key:
                lock.release()  # stored (or failed to build): other runs may have it now
        if not same_key:
            return
        runner = self.executor.get()
        unique = [group[0][1] for group in same_key.values()]
        for job in unique:
            self._announce(job, runner.in_process)
        outstanding = set(same_key)
        labels = {s: self.data.labels[s] for s in ("train", "val")}
        outcomes = runner.run(unique, self.data.pixels, labels, quiet=self.quiet, console=self.console)
        with closing(outcomes) if hasattr(outcomes, "close") else nullcontext():  # a stopped run stops its jobs
            for outcome in outcomes:
                job = outcome.job
                if job.key not in outstanding:
                    log.warning("executor %s reported %s again, or a job it was not given; ignored",
                                self.executor.name, job.name)
                    continue
                outstanding.discard(job.key)
                group = same_key[job.key]
                if not outcome.ok:
                    for p, _ in group:
                        self._fail(p.name, p.key, outcome)
                    held[job.key].release()
                    continue
                if job.key in self._completing:
                    completed = self._completing.pop(job.key)
                    completed = self.reg.add_outputs(completed, "train", outcome.result.logits["train"],
                                                     self.data.labels["train"], self.data.ids["train"])
                    held[job.key].release()
                    for p, _ in group:
                        self.console.log(f"reused [bold]{p.name}[/] from the zoo (key {short(p.key)}), predicted "
                                         "on train once for a student")
                        self._ready(p.index, from_stored(p.name, completed, action="reused"))
                    continue
                card = self._store(group[0][0], job, outcome.result)
                held[job.key].release()
                if not runner.in_process:
                    self.console.log(f"{job.label}: [bold]{job.name}[/] trained in {outcome.seconds:.1f}s on "
                                     f"{outcome.result.host} (best epoch {outcome.result.best_epoch})")
                for n, (p, _) in enumerate(group):
                    first = "trained" if job.train is not None else "predicted"
                    member = MemberResult(p.name, card, dict(outcome.result.logits), action=first if n == 0 else "reused")
                    member.resumed_from_epoch = (outcome.result.resumed_from_epoch or None) if n == 0 else None
                    self._ready(p.index, member)
        for key in sorted(outstanding):  # an executor that returned without reporting a job
            for p, job in same_key[key]:
                self._fail(p.name, p.key, JobOutcome.failure(job, FusionEngineError(
                    f"member {job.name}: the {self.executor.name} executor never reported it")))
            held[key].release()

    def _job(self, p: PlannedMember) -> MemberJob:
        """A member to train, as an executor gets it."""
        mspec, bound = self.items[p.index], self.bound[p.index]
        num_classes = len(self.data.class_names)
        origin = self.origins.get(p.index)
        job = MemberJob(
            name=mspec.name, key=p.key, backbone=bound.record, params=bound.params, train=mspec.train,
            seed=p.seed if p.seed is not None else 0, num_classes=num_classes, image_size=self.spec.data.image_size,
            input=self.inputs[p.index], device=self.device, resources=mspec.resources,
            label=f"{self.kind} {p.index + 1}/{len(self.items)}", index=p.index,
            pretrained=self.pretrained.get(p.index) if p.source in ("trained", "student") else None,
            weights=origin.path if origin is not None else None, class_order=origin.order if origin is not None else None,
            weights_sha256=origin.sha256 if origin is not None else None,
        )
        stored = self._completing.get(p.key)
        if stored is not None:  # its stored weights, run on train alone (in the class order they were stored in)
            job.train, job.splits = None, ("train",)
            job.weights = self.reg.member_dir(p.key) / WEIGHTS_FILE
            job.weights_sha256 = stored.entry.files[WEIGHTS_FILE]["sha256"]
        return job

    def _announce(self, job: MemberJob, in_process: bool) -> None:
        """Give an in-process job its checkpoint, and say whether it resumes."""
        job.checkpoint = self.reg.checkpoint(job.key) if in_process else None
        saved = job.checkpoint.peek() if job.checkpoint is not None else None
        if saved is not None:
            self.console.log(f"{job.label}: resuming [bold]{job.name}[/] ({job.backbone.name}) after epoch "
                             f"{saved.get('epoch')} of {job.train.epochs} from its checkpoint (key {short(job.key)})")
            log.info("resuming %s after epoch %s from its checkpoint", job.name, saved.get("epoch"))
        elif in_process:  # an executor elsewhere says when it hands each job out
            doing = "training" if job.train is not None else f"predicting with the weights {job.weights.name} of"
            self.console.log(f"{job.label}: {doing} [bold]{job.name}[/] ({job.backbone.name}, key {short(job.key)})")

    def _store(self, p: PlannedMember, job: MemberJob, fitted: FittedMember) -> MemberCard:
        """Publish a member trained (or run from its weights) here: weights, outputs, ids, card."""
        from safetensors.torch import save_file

        mspec, bound = self.items[p.index], self.bound[p.index]
        cfg = job.input
        best = next((h for h in fitted.history if h.get("epoch") == fitted.best_epoch), {})
        card = self._card(
            p, spec={"name": mspec.name, "backbone": mspec.backbone, "params": bound.params.model_dump(mode="json"),
                     "train": mspec.train.model_dump(mode="json") if mspec.train is not None else False,
                     "seed": p.seed},
            backbone=bound.record.name, plugin=bound.provided.plugin, logits=fitted.logits,
            input={"size": cfg.size, "mean": list(cfg.mean), "std": list(cfg.std), "in_chans": cfg.in_chans,
                   "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode,
                   "pipeline": fitted.pipeline},
            val_loss=best.get("val_loss"), best_epoch=fitted.best_epoch, history=fitted.history,
            resumed_from_epoch=fitted.resumed_from_epoch or None, n_params=fitted.n_params,
            timings={"train_seconds": round(fitted.train_seconds, 3), "predict_seconds": round(fitted.predict_seconds, 3),
                     "images_per_second": round(fitted.images_per_second, 1)},
            device=fitted.device)
        card = self._publish(p, card, fitted.logits, weights=lambda path: save_file(
            {k: v.contiguous() for k, v in fitted.state_dict.items()}, str(path), metadata={"format": "pt"}))
        self.reg.checkpoint(job.key).clear()
        return card

    def _store_predictions(self, p: PlannedMember) -> MemberCard:
        """Publish a member read from a predictions file: its outputs, ids and card (no weights)."""
        mspec = self.spec.members[p.index]
        logits = self.checked.predictions[p.index]
        card = self._card(p, spec={"name": mspec.name, "predictions": str(mspec.predictions), "kind": mspec.kind},
                          backbone="", plugin="", logits=logits, input=None, n_params=None)
        return self._publish(p, card, logits, weights=None)

    def _card(self, p: PlannedMember, *, logits: dict, spec: dict, **fields) -> MemberCard:
        """A new member's card: what every source shares (data, key, metrics, versions) and ``fields``."""
        from .provenance import library_versions

        data = self.data
        origin = self.origins.get(p.index)
        fields["metrics"] = {"val_accuracy": accuracy(data.labels["val"], logits["val"]), "val_loss": fields.pop("val_loss", None)}
        return MemberCard(
            format=p.material["format"], source=p.source, origin=origin.for_card() if origin is not None else None,
            name=p.name, experiment=self.spec.name, run_id=self.run_id, spec=spec, key_material=p.material,
            data={"dataset": self.spec.data.dataset, "params": self.resolved.dataset.params.model_dump(mode="json"),
                  "fingerprint": data.fingerprint, "split_sha256": data.split, "classes": data.class_names,
                  "split_sizes": data.split_sizes},
            versions=library_versions(), **fields)

    def _publish(self, p: PlannedMember, card: MemberCard, logits: dict, *, weights) -> MemberCard:
        """Store a new member under its key: ``weights(path)`` writes its weights (None: it has none)."""
        from .zoo.artifacts import write_outputs

        data = self.data
        stored = [s for s in SPLITS if s in logits]  # train too, when a member has its outputs there

        def write(folder: Path) -> None:
            if weights is not None:
                weights(folder / WEIGHTS_FILE)
            write_outputs(folder, {s: logits[s] for s in stored}, data.labels, data.ids)

        _, card = self.reg.publish(p.key, card, write)
        log.info("stored %s (%s) in the zoo as %s", p.name, p.source, p.key)
        return card


def calibrate_member(member: MemberResult, spec: MemberSpec, y_val: np.ndarray) -> MemberResult:
    """The calibrate stage of a run, for one member: when its spec asks ``calibrate: temperature``,
    the member with a temperature fitted on its val logits
    (:func:`fusion_engine.calibration.fit_temperature`) and its logits on every split divided by
    it; otherwise the member as it came."""
    from .calibration import fit_temperature

    if spec.calibrate != "temperature":
        return member
    temperature = fit_temperature(member.logits["val"], y_val)
    return replace(member, temperature=temperature,
                   logits={s: (v / temperature).astype(np.float32) for s, v in member.logits.items()})


def from_stored(name: str, stored: StoredMember, *, action: str) -> MemberResult:
    return MemberResult(name, stored.card, dict(stored.outputs.logits), action=action)


def check_outputs(stored: StoredMember, data: RunData) -> None:
    """A stored member's samples are this run's, in this run's order, with its labels."""
    key, outputs = stored.entry.key, stored.outputs
    for s in [*SCORED_SPLITS, *(["train"] if "train" in outputs.logits else [])]:
        if outputs.ids[s] != data.ids[s] or not np.array_equal(outputs.labels[s], data.labels[s]):
            raise CorruptArtifact(key, IDS_FILE, f"its {s} samples are not this run's (same key, other data)")
        if outputs.logits[s].shape != (len(data.ids[s]), len(data.class_names)):
            raise CorruptArtifact(key, OUTPUTS_FILE, f"{s} logits of shape {outputs.logits[s].shape}")


def stored_member(reg: Registry, key: str, name: str, data: RunData) -> StoredMember | None:
    """The stored member under ``key`` (its lock held), or None; damage is discarded with a warning."""
    try:
        stored = reg.open_member(key)
        if stored is not None:
            check_outputs(stored, data)
    except CorruptArtifact as exc:
        log.warning("%s; retraining %s", exc, name)
        reg.discard(key)
        return None
    if stored is not None:
        checkpoint = reg.checkpoint(key)
        if checkpoint.folder.exists():
            checkpoint.clear()  # left by a run killed after publishing: nothing to resume
    return stored


class _Held:
    """A member's zoo lock, held from when the run decides about it until it is stored."""

    def __init__(self, reg: Registry, key: str, name: str, console):
        def waiting() -> None:
            console.log(f"waiting for another run to finish with [bold]{name}[/] (key {short(key)})")
            log.info("waiting for the lock of %s (key %s), held by another run", name, key)

        self._reg, self._key, self._waiting = reg, key, waiting
        self._cm = None

    def acquire(self, *, wait: bool) -> bool:
        """Take the lock; without ``wait``, False when another process holds it."""
        cm = self._reg.lock(self._key, wait=wait, on_wait=self._waiting)
        try:
            cm.__enter__()
        except Busy:
            return False
        self._cm = cm
        return True

    def release(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


# -- members by reference ---------------------------------------------------------------------------

def referenced_member(resolved: ResolvedSpec, i: int, entry, reg: Registry, data: RunData, console) -> MemberResult:
    """A member named by ``zoo:`` (``entry``, chosen by the preflight checks), read from the zoo."""
    mspec = resolved.spec.members[i]
    with reg.lock(entry.key):
        try:
            stored = reg.open_member(entry.key)
            if stored is None:
                raise ZooError(f"zoo member {short(entry.key)} was removed while this run started")
            check_outputs(stored, data)
        except ZooError as exc:
            raise SpecError(f"{exc}", file=resolved.file, loc=("members", i, "zoo")) from None
    console.log(f"reused [bold]{mspec.name}[/] from the zoo (key {short(entry.key)}, "
                f"'{entry.name}' of experiment {entry.experiment})")
    return from_stored(mspec.name, stored, action="reused")


def import_members(resolved: ResolvedSpec, reg: Registry, names: list[str], *, checked: Preflight | None = None,
                   console=None) -> dict[str, MemberResult]:
    """``zoo import SPEC``: store a spec's members that come from ``weights`` or ``predictions``
    in the zoo without a run (no run folder, no fusers): the preflight checks (``checked``, when
    the caller ran them), then each member run or read as a run would, on the spec's device and
    executor, under the key a run would give it. ``names`` picks members (all such members when
    empty)."""
    from rich.console import Console

    from .data import run_data
    from .preflight import preflight

    console = console or Console(stderr=True, quiet=True)
    wanted = importable(resolved, names)
    checked = checked or preflight(resolved, registry=reg.root)
    data = run_data(checked.dataset, checked.indices, cache_dir=reg.image_cache_dir, fingerprint=checked.fingerprint)
    with LazyExecutor(resolved.executor) as executor:
        stage = MemberStage(resolved, checked, reg, data, executor, run_id=None, device=resolved.spec.device,
                            quiet=True, console=console, on_ready=lambda i, m: m,
                            on_failed=lambda name, key, error: None)
        return stage.run(only=wanted)


def importable(resolved: ResolvedSpec, names: list[str]) -> set[str]:
    """The members ``zoo import SPEC`` stores: those of ``names`` (all when empty) that come
    from ``weights`` or ``predictions`` files; an error names any other."""
    eligible = [m.name for m in resolved.spec.members if m.source in ("weights", "predictions")]
    for name in names:
        if name not in eligible:
            kind = next((m.source for m in resolved.spec.members if m.name == name), None)
            why = f"'{name}' is {'a member to train' if kind == 'trained' else 'taken from the zoo'}" if kind else \
                f"no member is called '{name}'"
            raise FusionEngineError(f"zoo import: {why}; it imports members from weights: or predictions: files "
                                    f"({', '.join(eligible) or 'this spec has none'})")
    if not eligible:
        raise FusionEngineError("zoo import: the spec has no member from a weights: or predictions: file")
    return set(names or eligible)
