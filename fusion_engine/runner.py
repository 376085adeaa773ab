"""One experiment, end to end: spec -> plugins -> data -> members -> fusers -> leaderboard.

The evaluation protocol lives here. The data are split once; members train on train, choose
their best epoch on val, and predict val and test once; fusers see member logits only, are
fitted on val and scored on val out-of-fold; test is touched only to score, and every row is
scored on the same test samples.

Members come from the zoo (:mod:`fusion_engine.zoo`) when it has them: each is looked up by its
key under the member's lock, trained (resuming its checkpoint) and published only when missing,
so a re-run of a spec trains and predicts nothing and a killed run picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RUN_LOG_ONLY, FusionEngineError, SpecError
from .leaderboard import Row, build_leaderboard, print_leaderboard, write_leaderboard
from .plugins import Plugins, get_plugins
from .records import BackboneRecord, ImageDataset, InputConfig, Provided
from .spec import ResolvedSpec, load_spec, parse_spec, read_spec_file, resolve_spec
from .zoo import (CorruptArtifact, Registry, ZooEntry, ZooError, describe_candidates, key_material, member_key, short,
                  split_digest)

log = logging.getLogger("fusion_engine")

REGISTRY_ENV = "FUSION_ENGINE_REGISTRY"
SPLITS = ("val", "test")


@dataclass
class MemberResult:
    """A member and its outputs on val and test, trained in this run or reused from the zoo."""

    name: str
    backbone: str
    logits: dict[str, np.ndarray]
    input: InputConfig
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    train_seconds: float = 0.0
    predict_seconds: float = 0.0
    n_params: int = 0
    temperature: float | None = None  # set when the member's logits were temperature-scaled
    key: str | None = None  # its zoo key
    action: str = "trained"  # "trained" (and predicted) in this run, or "reused" from the zoo
    resumed_from_epoch: int | None = None  # the checkpointed epoch its training resumed after


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


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    leaderboard: Any  # pandas.DataFrame
    members: dict[str, MemberResult]


def resolve_registry(registry: str | os.PathLike | None = None) -> Path:
    """``--registry`` first, then ``$FUSION_ENGINE_REGISTRY``, then ``./registry``."""
    return Path(registry or os.environ.get(REGISTRY_ENV) or "registry")


def prepare(spec_path: str | os.PathLike, *, executor: dict | None = None) -> tuple[ResolvedSpec, Plugins]:
    """Load a spec, load the plugins it lists, and bind every name; imports no torch.

    ``executor`` (``{"name": ..., "params": {...}}``, from the command line) replaces the spec's.
    """
    spec_path = Path(spec_path)
    label = str(spec_path)
    if executor is None:
        spec = load_spec(spec_path)
    else:
        data = read_spec_file(spec_path)
        given = data.get("executor")
        given = {"name": given} if isinstance(given, str) else dict(given) if isinstance(given, dict) else given
        if given is not None and not (isinstance(given, dict) and isinstance(given.get("params", {}), dict)):
            parse_spec(data, file=str(spec_path))  # malformed in the file: the error says so, as without --executor
        given = given or {}
        if executor.get("name") and executor["name"] != given.get("name", "local"):
            given = {"name": executor["name"]}  # another executor: the spec's params are not its params
        given["params"] = {**(given.get("params") or {}), **executor.get("params", {})}
        spec = parse_spec({**data, "executor": given}, file=f"{spec_path} (with --executor)")
        label = f"{spec_path} (with --executor)"
    base_dir = spec_path.resolve().parent
    try:
        plugins = get_plugins([base_dir / p for p in spec.plugins])
    except FusionEngineError as exc:
        raise type(exc)(f"{spec_path}: plugins: {exc}") from None
    resolved = resolve_spec(spec, _WithZooMembers(plugins.catalog()), file=label, base_dir=base_dir)
    return resolved, plugins


def _zoo_only(*args, **kwargs):
    raise FusionEngineError("a member taken from the zoo is loaded, never built")


#: what a member taken from the zoo binds to: it has no backbone to build and takes no params
ZOO_MEMBER = Provided(BackboneRecord("zoo", build=_zoo_only, description="a member reused from the zoo"),
                      plugin="fusion_engine.zoo")


class _WithZooMembers:
    """The plugin catalog, seen by :func:`resolve_spec`: a member given by ``zoo:`` (no
    ``backbone``) binds to :data:`ZOO_MEMBER`; every other name to its plugin."""

    def __init__(self, catalog):
        self._catalog = catalog

    def get(self, kind: str, name: str | None) -> Provided:
        if kind == "backbone" and name is None:
            return ZOO_MEMBER
        return self._catalog.get(kind, name)

    def __getattr__(self, name: str):
        return getattr(self._catalog, name)


def run_experiment(
    spec_path: str | os.PathLike,
    *,
    registry: str | os.PathLike | None = None,
    device: str | None = None,
    quiet: bool = False,
    executor: dict | None = None,
) -> RunResult:
    """Run the experiment a spec file describes and write its run folder.

    ``executor`` (``{"name": "ray", "params": {"address": "auto"}}``) overrides the spec's.
    """
    resolved, plugins = prepare(spec_path, executor=executor)
    spec = resolved.spec
    device = device or spec.device
    registry_dir = resolve_registry(registry)
    _check_references_exist(resolved, registry_dir)
    with _LazyExecutor(resolved) as runs_members:
        if device == "cuda" and runs_members.local:
            from .training import resolve_device

            resolve_device(device)  # no CUDA is bad input: say so before any folder is made
        run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{spec.name}-{secrets.token_hex(2)}"
        with Registry(registry_dir) as reg:
            run_dir = reg.run_dir(run_id)
            try:
                run_dir.mkdir(parents=True)
            except OSError as exc:
                raise FusionEngineError(f"cannot create run folder {run_dir}: {exc.strerror}") from None
            with reg.run_lock(run_id):
                return _run(resolved, plugins, reg, run_id, run_dir, Path(spec_path), device, quiet, runs_members)


class _LazyExecutor:
    """The spec's executor, made from its plugin (the built-in local one when the spec names
    none) when a member first needs training: a run whose members are all in the zoo never
    starts or reaches a Ray cluster."""

    def __init__(self, resolved: ResolvedSpec):
        self.entry = resolved.executor
        self.name = self.entry.record.name if self.entry is not None else "local"
        self._made = None

    @property
    def local(self) -> bool:
        return self.name == "local"

    def get(self):
        from .executors import Executor, LocalExecutor

        if self._made is None:
            made = LocalExecutor() if self.entry is None else self.entry.record.create(self.entry.params)
            if not isinstance(made, Executor):
                raise FusionEngineError(f"executor plugin {self.entry.provided.plugin} made {type(made).__name__}, "
                                        f"expected a fusion_engine.executors.Executor")
            self._made = made
        return self._made

    def close(self) -> None:
        if self._made is not None:
            made, self._made = self._made, None
            made.close()

    def __enter__(self) -> "_LazyExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run(resolved: ResolvedSpec, plugins: Plugins, reg: Registry, run_id: str, run_dir: Path, spec_path: Path,
         device: str, quiet: bool, executor) -> RunResult:
    from rich.console import Console

    from .data import dataset_fingerprint

    spec = resolved.spec
    console = Console(stderr=True, quiet=quiet)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    warnings = _WarningList()
    log.addHandler(handler)
    log.addHandler(warnings)
    previous_level = log.level
    log.setLevel(logging.INFO)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "run_id": run_id,
        "experiment": spec.name,
        "spec_file": str(spec_path.resolve()),
        "status": "running",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "executor": executor.name,
        "registry": str(reg.root.resolve()),
        "versions": _versions(),
        "members": {},
        "warnings": warnings.messages,
    }
    ctx = RunContext(resolved, run_id, run_dir, reg.root, plugins)
    reg.run_started(run_id, experiment=spec.name, spec_file=record["spec_file"], n_members=len(spec.members),
                    n_fusers=len(spec.fusers))
    try:
        write_json(run_dir / "spec.json", resolved.resolved_dict())
        _write_text(run_dir / "spec.yaml", _to_yaml(resolved.resolved_dict()))
        write_json(run_dir / "run.json", record)
        plugins.hook.on_run_start(run=ctx)

        dataset, indices, y = _load_data(resolved, ctx, console)
        ids = {s: [str(dataset.ids[i]) for i in idx] for s, idx in indices.items()}
        data = _RunData(dataset, indices, y, ids, dataset_fingerprint(dataset), split_digest(ids), cache_dir=reg.image_cache_dir)
        record["data"] = {"split_sizes": ctx.split_sizes, "classes": ctx.class_names, "fingerprint": data.fingerprint,
                          "split_sha256": data.split}
        _write_split(run_dir, dataset, indices)

        members = _members(resolved, ctx, reg, data, device, quiet, console, record, executor)
        executor.close()  # a Ray instance it started is stopped before anything forks to draw plots
        n_scored = sum(len(y[s]) for s in SPLITS)
        rows = [
            Row(name=m.name, kind="member", members=[m.name], proba={s: _softmax(m.logits[s]) for s in SPLITS},
                extra={"n_params": m.n_params, "train_seconds": m.train_seconds,
                       "infer_ms_per_image": 1000.0 * m.predict_seconds / max(1, n_scored)})
            for m in members.values()
        ]
        rows += fit_fusers(resolved, ctx, members, y, console)

        metrics = [p.record for p in plugins.catalog().records["metric"].values()]
        rank_by = spec.rank_by
        leaderboard = build_leaderboard(rows, y, metrics, rank_by=rank_by, seed=spec.seed)
        meta = {"run_id": run_id, "experiment": spec.name, "ranked_by": leaderboard.attrs.get("ranked_by", rank_by),
                "scored_on": "test", "split_sizes": ctx.split_sizes}
        write_leaderboard(leaderboard, run_dir, meta=meta)
        _write_predictions(run_dir, dataset, indices, y, rows)
        if not quiet:
            print_leaderboard(leaderboard, title=f"{spec.name}: scored on {ctx.split_sizes['test']} test samples")
        plugins.hook.on_run_end(run=ctx, leaderboard=leaderboard)
        seconds = round(time.perf_counter() - started, 3)
        record.update(status="complete", seconds=seconds, fusers=[f.name for f in spec.fusers])
        write_json(run_dir / "run.json", record)
        reg.run_finished(run_id, status="complete", seconds=seconds)
        log.info("run %s complete in %.1fs", run_id, seconds)
        _write_plots_and_report(run_dir, console)
        return RunResult(run_id, run_dir, leaderboard, members)
    except BaseException as exc:
        seconds = round(time.perf_counter() - started, 3)
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record.update(status=status, error=f"{type(exc).__name__}: {exc}", seconds=seconds)
        write_json(run_dir / "run.json", record)
        # The CLI reports the error itself, once; this line is for run.log.
        log.error("run %s %s: %s", run_id, status, record["error"], extra={RUN_LOG_ONLY: True})
        try:
            reg.run_finished(run_id, status=status, seconds=seconds, error=record["error"])
        except Exception as index_exc:  # the run's own error is the one to report
            log.error("could not record the run's end in the registry index: %s", index_exc)
        raise
    finally:
        log.removeHandler(handler)
        log.removeHandler(warnings)
        handler.close()
        log.setLevel(previous_level)


class _WarningList(logging.Handler):
    """The run's warnings, kept for ``run.json``."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class _RunData:
    dataset: ImageDataset
    indices: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    ids: dict[str, list[str]]
    fingerprint: str
    split: str
    cache_dir: Path | None = None
    images: dict = field(default_factory=dict)

    def pixels(self, cfg: InputConfig) -> dict:
        """train/val/test images at the size and channels ``cfg`` asks for: decoded once a run,
        and for datasets of files once a machine (:func:`fusion_engine.data.cached_images`)."""
        from .data import cached_images

        key = (cfg.size, cfg.in_chans)
        if key not in self.images:
            images = cached_images(self.dataset.images, self.fingerprint, cfg.size, cfg.in_chans, self.cache_dir, log=log)
            self.images[key] = {s: images[self.indices[s]] for s in ("train", "val", "test")}
        return self.images[key]


# -- steps ----------------------------------------------------------------------------------------

def _load_data(resolved: ResolvedSpec, ctx: RunContext, console) -> tuple[ImageDataset, dict, dict]:
    from .data import split_indices

    ds_entry = resolved.dataset
    console.log(f"loading dataset [bold]{resolved.spec.data.dataset}[/]")
    dataset = ds_entry.record.load(ds_entry.params, base_dir=resolved.base_dir)
    if not isinstance(dataset, ImageDataset):
        raise FusionEngineError(f"dataset plugin {ds_entry.provided.plugin} returned {type(dataset).__name__}, expected ImageDataset")
    if dataset.split is not None and "split" in resolved.spec.data.model_fields_set:
        log.warning("dataset '%s' brings its own train/val/test split; data.split is ignored", resolved.spec.data.dataset)
    indices = split_indices(dataset, resolved.spec.data.split, resolved.spec.seed)
    ctx.class_names = list(dataset.class_names)
    ctx.split_sizes = {k: int(len(v)) for k, v in indices.items()}
    y = {s: dataset.labels[indices[s]] for s in SPLITS}
    log.info("dataset %s: %s, %d classes", resolved.spec.data.dataset, ctx.split_sizes, len(ctx.class_names))
    return dataset, indices, y


def _members(resolved: ResolvedSpec, ctx: RunContext, reg: Registry, data: _RunData, device, quiet, console,
             record: dict, executor) -> dict[str, MemberResult]:
    """Every member: from the zoo where it is stored, else trained and predicted by the executor
    and stored there. A member that fails does not stop the others; the run then fails naming it."""
    from contextlib import closing, nullcontext

    spec = resolved.spec
    results: dict[str, MemberResult] = {}
    failures: dict[str, str] = {}

    def ready(i: int, member: MemberResult) -> None:
        mspec = spec.members[i]
        if mspec.calibrate == "temperature":
            from .calibration import fit_temperature

            member.temperature = fit_temperature(member.logits["val"], data.y["val"])
            member.logits = {s: (v / member.temperature).astype(np.float32) for s, v in member.logits.items()}
        _write_member(ctx.run_dir, member, reg)
        entry_record = {"key": member.key, "action": member.action, "source": "zoo" if mspec.zoo is not None else "spec"}
        if member.resumed_from_epoch:
            entry_record["resumed_from_epoch"] = member.resumed_from_epoch
        if member.action == "trained":
            entry_record["executor"] = executor.name
        record["members"][member.name] = entry_record
        _record_actions(record)
        write_json(ctx.run_dir / "run.json", record)
        reg.run_member(ctx.run_id, member.name, member.key, member.action)
        log.info("member %s: %s, key %s, best epoch %s, val accuracy %.4f", member.name, member.action, member.key,
                 member.best_epoch, float(np.mean(np.argmax(member.logits["val"], 1) == data.y["val"])))
        ctx.plugins.hook.on_member_ready(run=ctx, member=member)
        results[member.name] = member

    def fail(outcome, name: str | None = None) -> None:
        name = name or outcome.job.name
        failures[name] = outcome.error
        record["members"][name] = {"key": outcome.job.key, "action": "failed", "error": outcome.error,
                                   "executor": executor.name}
        log.error("member %s failed after %.1fs: %s\n%s", name, outcome.seconds, outcome.error,
                  outcome.traceback or "", extra={RUN_LOG_ONLY: True})
        console.log(f"[red]member {name} failed[/]: {outcome.error}")
        _record_actions(record)
        write_json(ctx.run_dir / "run.json", record)

    planned = {}  # spec index -> (key, material, seed) of each member the spec trains
    for i, (mspec, entry) in enumerate(zip(spec.members, resolved.members)):
        if mspec.zoo is not None:
            ready(i, _referenced_member(resolved, i, reg, data, console))
        else:
            planned[i] = _member_key(resolved, i, entry, data)

    def settle(indices: list[int], held: dict) -> None:
        """Reuse or train the members at ``indices``; the run holds their keys' locks in ``held``."""
        jobs = []
        for i in indices:
            key, _, seed = planned[i]
            stored = _stored(reg, key, spec.members[i].name, data)
            if stored is not None:
                zoo_entry, card, outputs = stored
                console.log(f"reused [bold]{spec.members[i].name}[/] from the zoo (key {short(key)})")
                ready(i, _from_card(spec.members[i].name, zoo_entry, card, outputs, action="reused"))
                continue
            try:
                jobs.append(_job(resolved, i, key, seed, data, reg, device, executor))
            except FusionEngineError:
                raise  # bad input (mean/std against the backbone's channels): the run's error
            except Exception as exc:  # the backbone plugin failed to build: this member fails alone
                from .executors import failed

                fail(failed(SimpleNamespace(name=spec.members[i].name, key=key), exc))
        by_key = {}
        for job in jobs:  # members alike in all but their names share a key: trained once
            by_key.setdefault(job.key, []).append(job)
        for key, lock in held.items():
            if key not in by_key:
                lock.release()  # stored (or failed to build): other runs may have it now
        if not by_key:
            return
        runner = executor.get()
        unique = [same[0] for same in by_key.values()]
        for job in unique:
            job.checkpoint = reg.checkpoint(job.key) if runner.in_process else None
            saved = job.checkpoint.peek() if job.checkpoint is not None else None
            if saved is not None:
                console.log(f"{job.label}: resuming [bold]{job.name}[/] ({job.backbone.name}) after epoch "
                            f"{saved.get('epoch')} of {job.train.epochs} from its checkpoint (key {short(job.key)})")
                log.info("resuming %s after epoch %s from its checkpoint", job.name, saved.get("epoch"))
            elif runner.in_process:  # an executor elsewhere says when it hands each job out
                console.log(f"{job.label}: training [bold]{job.name}[/] ({job.backbone.name}, key {short(job.key)})")
        labels = {s: data.dataset.labels[data.indices[s]] for s in ("train", "val")}
        outstanding = set(by_key)
        outcomes = runner.run(unique, data.pixels, labels, quiet=quiet, console=console)
        with closing(outcomes) if hasattr(outcomes, "close") else nullcontext():  # a stopped run stops its jobs
            for outcome in outcomes:
                job = outcome.job
                if job.key not in outstanding:
                    log.warning("executor %s reported %s again, or a job it was not given; ignored", executor.name, job.name)
                    continue
                outstanding.discard(job.key)
                same = by_key[job.key]
                if not outcome.ok:
                    for other in same:
                        fail(outcome, other.name)
                    held[job.key].release()
                    continue
                zoo_entry, card = _store(resolved, job, outcome.result, ctx, reg, data,
                                         material=planned[_index(spec, job.name)][1])
                held[job.key].release()
                if not runner.in_process:
                    console.log(f"{job.label}: [bold]{job.name}[/] trained in {outcome.seconds:.1f}s on "
                                f"{outcome.result.host} (best epoch {outcome.result.best_epoch})")
                for n, other in enumerate(same):
                    member = _from_card(other.name, zoo_entry, {**card, "key": job.key}, None,
                                        action="trained" if n == 0 else "reused", logits=outcome.result.logits)
                    member.resumed_from_epoch = (outcome.result.resumed_from_epoch or None) if n == 0 else None
                    ready(_index(spec, other.name), member)
        from .executors import failed

        for key in sorted(outstanding):  # an executor that returned without reporting a job
            for job in by_key[key]:
                fail(failed(job, FusionEngineError(f"member {job.name}: the {executor.name} executor never reported it")))

    # Members whose lock is free are settled first, all together (in parallel where the executor
    # can); then, one at a time, those another run is busy with: by the time their lock is ours,
    # that run has usually stored them. Locks are taken in key order and, while waiting, the run
    # holds no other, so two runs never wait for each other in a cycle.
    indices_of: dict[str, list[int]] = {}  # key -> the spec indices of the members it stands for
    for i, (key, _, _) in planned.items():
        indices_of.setdefault(key, []).append(i)
    locks = {key: _Held(reg, key, spec.members[indices[0]].name, console) for key, indices in indices_of.items()}
    held: dict[str, _Held] = {}
    try:
        for key in sorted(indices_of):
            if locks[key].acquire(wait=False):
                held[key] = locks[key]
        settle(sorted(i for key in held for i in indices_of[key]), held)  # in spec order
        for key in sorted(set(indices_of) - set(held)):
            locks[key].acquire(wait=True)
            held[key] = locks[key]
            settle(indices_of[key], {key: locks[key]})
    finally:
        for lock in held.values():
            lock.release()
    if failures:
        raise MembersFailed(failures, stored=len(results), total=len(spec.members))
    return {m.name: results[m.name] for m in spec.members}


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


def _index(spec, name: str) -> int:
    return next(i for i, m in enumerate(spec.members) if m.name == name)


def _record_actions(record: dict) -> None:
    members = record["members"]
    record["trained"] = [n for n, m in members.items() if m["action"] == "trained"]
    record["predicted"] = list(record["trained"])
    record["reused"] = [n for n, m in members.items() if m["action"] == "reused"]
    record["failed"] = [n for n, m in members.items() if m["action"] == "failed"]


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
        from .zoo import Busy

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


def _train_config(train) -> dict:
    """The training config as it enters a key: ``lr`` and ``weight_decay`` resolved, so leaving
    them to their defaults and writing the defaults out are the same member."""
    data = train.model_dump(mode="json")
    data["lr"] = train.resolved_lr
    data["weight_decay"] = train.resolved_weight_decay
    return data


def _member_key(resolved: ResolvedSpec, i: int, entry, data: _RunData) -> tuple[str, dict, int]:
    spec = resolved.spec
    mspec = spec.members[i]
    seed = spec.seed if mspec.seed is None else mspec.seed
    material = key_material(
        backbone=entry.record.name, params=entry.params.model_dump(mode="json"), train=_train_config(mspec.train),
        seed=seed, image_size=spec.data.image_size, mean=spec.data.mean, std=spec.data.std,
        fingerprint=data.fingerprint, split=data.split,
    )
    return member_key(material), material, seed


def _stored(reg: Registry, key: str, name: str, data: _RunData):
    """The stored member under ``key`` (its lock held), or None; damage is discarded with a warning."""
    try:
        stored = reg.open_member(key)
        if stored is not None:
            _check_outputs(stored[0], stored[2], data)
    except CorruptArtifact as exc:
        log.warning("%s; retraining %s", exc, name)
        reg.discard(key)
        return None
    if stored is not None:
        checkpoint = reg.checkpoint(key)
        if checkpoint.folder.exists():
            checkpoint.clear()  # left by a run killed after publishing: nothing to resume
    return stored


def _job(resolved: ResolvedSpec, i: int, key: str, seed: int, data: _RunData, reg: Registry, device, executor):
    """A member to train, as an executor gets it (its checkpoint is set when it runs here)."""
    from .executors import MemberJob, build_member

    spec = resolved.spec
    mspec = spec.members[i]
    entry = resolved.members[i]
    job = MemberJob(
        name=mspec.name, key=key, backbone=entry.record, params=entry.params, train=mspec.train, seed=seed,
        num_classes=len(data.dataset.class_names), image_size=spec.data.image_size, input=None, device=device,
        resources=mspec.resources, label=f"member {i + 1}/{len(spec.members)}",
    )
    job.input = _input_config(build_member(job).input, spec.data)  # the size and channels its images need
    return job


def _store(resolved: ResolvedSpec, job, fitted, ctx: RunContext, reg: Registry, data: _RunData, *,
           material: dict) -> tuple[ZooEntry, dict]:
    """Publish a trained member in the zoo: weights, outputs, ids and its card."""
    from safetensors.numpy import save_file as save_arrays
    from safetensors.torch import save_file

    spec = resolved.spec
    i = _index(spec, job.name)
    mspec = spec.members[i]
    entry = resolved.members[i]
    cfg = job.input
    logits = fitted.logits
    val_accuracy = float(np.mean(np.argmax(logits["val"], 1) == data.y["val"]))
    best = next((h for h in fitted.history if h.get("epoch") == fitted.best_epoch), {})
    card = {
        "format": material["format"],
        "name": mspec.name,
        "experiment": spec.name,
        "run_id": ctx.run_id,
        "spec": {"name": mspec.name, "backbone": mspec.backbone, "params": entry.params.model_dump(mode="json"),
                 "train": mspec.train.model_dump(mode="json"), "seed": job.seed},
        "backbone": entry.record.name,
        "plugin": entry.provided.plugin,
        "key_material": material,
        "data": {"dataset": spec.data.dataset, "params": resolved.dataset.params.model_dump(mode="json"),
                 "fingerprint": data.fingerprint, "split_sha256": data.split, "classes": list(data.dataset.class_names),
                 "split_sizes": {s: len(v) for s, v in data.indices.items()}},
        "input": {"size": cfg.size, "mean": list(cfg.mean), "std": list(cfg.std), "in_chans": cfg.in_chans},
        "metrics": {"val_accuracy": val_accuracy, "val_loss": best.get("val_loss")},
        "best_epoch": fitted.best_epoch,
        "history": fitted.history,
        "resumed_from_epoch": fitted.resumed_from_epoch or None,
        "n_params": fitted.n_params,
        "timings": {"train_seconds": round(fitted.train_seconds, 3), "predict_seconds": round(fitted.predict_seconds, 3),
                    "images_per_second": round(fitted.images_per_second, 1)},
        "device": fitted.device,
        "versions": _versions(),
    }

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in fitted.state_dict.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        save_arrays({**{f"{s}_logits": np.ascontiguousarray(logits[s], dtype=np.float32) for s in SPLITS},
                     **{f"{s}_labels": np.ascontiguousarray(data.y[s], dtype=np.int64) for s in SPLITS}},
                    str(folder / "outputs.safetensors"))
        (folder / "ids.json").write_text(json.dumps({s: data.ids[s] for s in SPLITS}) + "\n", encoding="utf-8")

    zoo_entry = reg.publish(job.key, card, write, entry={
        "name": mspec.name, "experiment": spec.name, "run_id": ctx.run_id, "backbone": entry.record.name,
        "dataset": spec.data.dataset, "fingerprint": data.fingerprint, "split": data.split,
        "val_accuracy": val_accuracy, "n_params": fitted.n_params,
    })
    reg.checkpoint(job.key).clear()
    log.info("stored %s in the zoo as %s", mspec.name, job.key)
    return zoo_entry, card


def _from_card(name: str, entry: ZooEntry, card: dict, outputs, *, action: str, logits=None) -> MemberResult:
    inp = card["input"]
    timings = card.get("timings", {})
    return MemberResult(
        name=name, backbone=card.get("backbone", entry.backbone),
        logits=dict(logits) if logits is not None else dict(outputs.logits),
        input=InputConfig(size=inp["size"], mean=tuple(inp["mean"]), std=tuple(inp["std"]), in_chans=inp["in_chans"]),
        history=card.get("history", []), best_epoch=card.get("best_epoch"),
        train_seconds=float(timings.get("train_seconds") or 0.0), predict_seconds=float(timings.get("predict_seconds") or 0.0),
        n_params=int(card.get("n_params") or 0), key=entry.key, action=action,
    )


def _check_outputs(entry: ZooEntry, outputs, data: _RunData) -> None:
    """A stored member's samples are this run's, in this run's order, with its labels."""
    for s in SPLITS:
        if outputs.ids[s] != data.ids[s] or not np.array_equal(outputs.labels[s], data.y[s]):
            raise CorruptArtifact(entry.key, "ids.json", f"its {s} samples are not this run's (same key, other data)")
        if outputs.logits[s].shape != (len(data.ids[s]), len(data.dataset.class_names)):
            raise CorruptArtifact(entry.key, "outputs.safetensors", f"{s} logits of shape {outputs.logits[s].shape}")


# -- members by reference ---------------------------------------------------------------------------

def _check_references_exist(resolved: ResolvedSpec, registry_dir: Path) -> None:
    """Fail before a run is made when a ``zoo:`` member names nothing in the registry."""
    refs = [(i, m.zoo) for i, m in enumerate(resolved.spec.members) if m.zoo is not None]
    if not refs:
        return
    with Registry(registry_dir, create=False) as reg:
        for i, ref in refs:
            if not reg.find(ref):
                raise SpecError(f"no zoo member matches '{ref}' (a key, key prefix or member name) in registry "
                                f"{registry_dir}; `fusion-engine zoo list --registry {registry_dir}` shows them",
                                file=resolved.file, loc=("members", i, "zoo"))


def _referenced_member(resolved: ResolvedSpec, i: int, reg: Registry, data: _RunData, console) -> MemberResult:
    """A member named by ``zoo:``: it must have been trained on this run's data and split."""
    mspec = resolved.spec.members[i]
    loc = ("members", i, "zoo")
    found = reg.find(mspec.zoo)
    fitting = [e for e in found if e.fingerprint == data.fingerprint and e.split == data.split]
    if len(found) == 1:
        chosen = found[0]
    elif len(fitting) == 1:
        chosen = fitting[0]
    elif not found:
        raise SpecError(f"no zoo member matches '{mspec.zoo}' in registry {reg.root}", file=resolved.file, loc=loc)
    else:
        shown = fitting or found
        raise SpecError(f"'{mspec.zoo}' is ambiguous: {len(shown)} zoo members match"
                        f"{' and were trained on this data' if fitting else ''}; give a longer key prefix. "
                        f"Candidates: {describe_candidates(shown)}", file=resolved.file, loc=loc)
    if chosen.fingerprint != data.fingerprint or chosen.split != data.split:
        what = [f"data fingerprint {chosen.fingerprint[:16]} (this run: {data.fingerprint[:16]})"
                if chosen.fingerprint != data.fingerprint else "",
                f"split {chosen.split[:16]} (this run: {data.split[:16]})" if chosen.split != data.split else ""]
        raise SpecError(f"zoo member {short(chosen.key)} ({chosen.name}, experiment {chosen.experiment}) was trained on "
                        f"other data: {' and '.join(w for w in what if w)}; fusers may only combine members scored on "
                        f"the same samples", file=resolved.file, loc=loc)
    with reg.lock(chosen.key):
        try:
            stored = reg.open_member(chosen.key)
            if stored is None:
                raise ZooError(f"zoo member {short(chosen.key)} was removed while this run started")
            _check_outputs(stored[0], stored[2], data)
        except ZooError as exc:
            raise SpecError(f"{exc}", file=resolved.file, loc=loc) from None
    zoo_entry, card, outputs = stored
    console.log(f"reused [bold]{mspec.name}[/] from the zoo (key {short(chosen.key)}, "
                f"'{chosen.name}' of experiment {chosen.experiment})")
    return _from_card(mspec.name, zoo_entry, card, outputs, action="reused")


def _input_config(cfg: InputConfig, data) -> InputConfig:
    """The backbone's input config with the spec's overrides applied."""
    mean = tuple(data.mean) if data.mean is not None else tuple(cfg.mean)
    std = tuple(data.std) if data.std is not None else tuple(cfg.std)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != cfg.in_chans:
            raise FusionEngineError(f"data.{label} has {len(values)} values but the backbone takes {cfg.in_chans} channels")
    return InputConfig(size=data.image_size or cfg.size, mean=mean, std=std, in_chans=cfg.in_chans)


def _write_member(run_dir: Path, member: MemberResult, reg: Registry) -> None:
    """``members/<name>/``: the logits this run used (after calibration) and a card pointing at
    the zoo, where the weights live once."""
    from safetensors.numpy import save_file

    out = run_dir / "members" / member.name
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{s}_logits": np.ascontiguousarray(member.logits[s], dtype=np.float32) for s in SPLITS},
              str(out / "outputs.safetensors"))
    write_json(out / "card.json", {
        "name": member.name, "key": member.key, "action": member.action,
        "zoo": str(reg.member_dir(member.key).relative_to(reg.root)),
        "backbone": member.backbone, "temperature": member.temperature,
        "resumed_from_epoch": member.resumed_from_epoch,
        "input": {"size": member.input.size, "mean": list(member.input.mean), "std": list(member.input.std),
                  "in_chans": member.input.in_chans},
        "best_epoch": member.best_epoch, "history": member.history, "n_params": member.n_params,
        "train_seconds": round(member.train_seconds, 3), "predict_seconds": round(member.predict_seconds, 3),
    })


def fit_fusers(resolved, ctx, members: dict[str, MemberResult], y, console) -> list[Row]:
    """Fit every fuser on val and score it there out-of-fold; apply it to test.

    Each fuser's full fit and fold fits run side by side, one per core, each with one BLAS
    thread (many small fits on one shared BLAS pool oversubscribe the cores).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _fit_fusers_unlimited(resolved, ctx, members, y, console)


def _fit_fusers_unlimited(resolved, ctx, members: dict[str, MemberResult], y, console) -> list[Row]:
    from .calibration import TemperatureScaled
    from .crossfit import cross_fit

    rows = []
    out = ctx.run_dir / "fusers"
    for fspec, entry in zip(resolved.spec.fusers, resolved.fusers):
        names = fspec.members or list(members)
        logits = {s: np.stack([members[n].logits[s] for n in names]) for s in SPLITS}
        fuser = entry.record.cls(**entry.params.model_dump())
        if fspec.temperature:
            fuser = TemperatureScaled(fuser, seed=resolved.spec.seed)
        console.log(f"fitting fuser [bold]{fspec.name}[/] ({fspec.fuser}) on {len(names)} members")
        fuser, val_proba, fit_seconds = cross_fit(fuser, logits["val"], y["val"], seed=resolved.spec.seed, n_jobs=-1)
        t0 = time.perf_counter()
        test_proba = fuser.predict_proba(logits["test"])
        predict_ms_per_image = 1000.0 * (time.perf_counter() - t0) / max(1, len(y["test"]))
        weights = getattr(fuser, "weights_", None)
        out.mkdir(exist_ok=True)
        write_json(out / f"{fspec.name}.json", {
            "name": fspec.name, "fuser": fspec.fuser, "plugin": entry.provided.plugin, "members": names,
            "params": entry.params.model_dump(mode="json"), "temperature": fspec.temperature,
            "state": fuser.get_state(),
        })
        rows.append(Row(
            name=fspec.name, kind="fuser", members=names, proba={"val": val_proba, "test": test_proba},
            weights=None if weights is None else [float(w) for w in weights], extra={"fit_seconds": fit_seconds, "predict_ms_per_image": predict_ms_per_image},
        ))
    return rows


# -- outputs --------------------------------------------------------------------------------------

def _write_split(run_dir: Path, dataset: ImageDataset, indices: dict) -> None:
    write_json(run_dir / "split.json", {
        "classes": list(dataset.class_names),
        **{s: {"ids": [dataset.ids[i] for i in idx], "labels": dataset.labels[idx].tolist()} for s, idx in indices.items()},
    })


def _write_plots_and_report(run_dir: Path, console) -> None:
    """Plots and report.html, drawn from the finished run folder. A failure here is a warning:
    the run's results are already written, and ``fusion-engine report`` can draw them again."""
    from .plots import write_plots
    from .report import write_report

    try:
        report = write_report(run_dir, plots=write_plots(run_dir))
        console.log(f"report: {report}")
    except Exception as exc:
        log.warning("could not draw the plots and report of %s: %s: %s (retry with: fusion-engine report %s)",
                    run_dir.name, type(exc).__name__, exc, run_dir.name)


def _write_predictions(run_dir: Path, dataset: ImageDataset, indices: dict, y: dict, rows: list[Row]) -> None:
    """``predictions_{val,test}.csv``: per sample, the label and each row's predicted class;
    ``probabilities.safetensors``: each row's probabilities, keyed ``<row>/<split>``."""
    import pandas as pd
    from safetensors.numpy import save_file

    save_file({f"{row.name}/{s}": np.ascontiguousarray(row.proba[s], dtype=np.float64) for row in rows for s in SPLITS},
              str(run_dir / "probabilities.safetensors"))
    for s in SPLITS:
        df = pd.DataFrame({"id": [dataset.ids[i] for i in indices[s]], "label": y[s]})
        for row in rows:
            df[row.name] = np.argmax(row.proba[s], axis=1)
        df.to_csv(run_dir / f"predictions_{s}.csv", index=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(logits.astype(np.float64), axis=1)


def write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write whole or not at all: a temporary file moved into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fusion-engine", "torch", "timm", "numpy", "scikit-learn", "xgboost"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
