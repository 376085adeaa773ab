"""The hooks a fusion-engine plugin may implement. Each docstring is the plugin author's contract.

Implement a hook with the ``hookimpl`` marker and register the module through the entry-point
group ``fusion_engine``::

    from fusion_engine import hookimpl, BackboneRecord

    @hookimpl
    def register_backbones():
        return [BackboneRecord(name="my-net", build=build_my_net, params=MyNetParams)]

Hooks are called with keyword arguments; an implementation may accept fewer arguments than the
spec lists, which is how hooks grow without breaking plugins.
"""

from __future__ import annotations

import pluggy

PROJECT = "fusion_engine"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backbones():
    """Return an iterable of :class:`~fusion_engine.BackboneRecord`.

    Each record has a ``name`` used as ``backbone:`` in a spec, a pydantic ``params`` model
    (``extra="forbid"``; subclass :class:`~fusion_engine.Params`) and a factory
    ``build(params, num_classes=int, image_size=int | None) -> BuiltBackbone``. The factory
    imports torch itself, so listing and validating plugins never imports it.
    """


@hookspec
def register_fusers():
    """Return an iterable of :class:`~fusion_engine.FuserRecord`.

    ``cls(**params)`` must be an unfitted :class:`~fusion_engine.Fuser`: ``fit(logits (M, N, C),
    y (N,)) -> self``, ``predict_proba(logits) -> (N, C)``, and ``get_state()`` /
    ``set_state(state)`` with a JSON-able state. Fusers see member logits only, never images.
    """


@hookspec
def register_datasets():
    """Return an iterable of :class:`~fusion_engine.DatasetRecord`.

    ``load(params, base_dir=Path) -> ImageDataset``: the images (paths, PIL images or uint8
    arrays), integer labels, class names, unique sample ids and, where the dataset defines its
    own split, ``"train"``/``"val"``/``"test"`` per sample. Raise
    :class:`~fusion_engine.FusionEngineError` naming the path for missing or unreadable data.
    """


@hookspec
def register_metrics():
    """Return an iterable of :class:`~fusion_engine.MetricRecord`.

    ``fn(y_true (N,), proba (N, C)) -> float`` scores one leaderboard row on one split;
    ``higher_is_better`` tells how rows are ranked when the metric ranks them.
    """


@hookspec
def register_executors():
    """Return an iterable of :class:`~fusion_engine.ExecutorRecord`.

    ``create(params) -> Executor`` (see :class:`fusion_engine.executors.Executor`): an object
    whose ``run(jobs)`` trains and predicts each :class:`~fusion_engine.executors.MemberJob`
    (with :func:`fusion_engine.executors.fit_member`, wherever it likes) and yields one
    :class:`~fusion_engine.executors.JobOutcome` per job as each finishes, its ``error`` set when
    the job failed; and ``close()``. The run stores what comes back in the zoo. First-party:
    ``local`` (in-process) and ``ray``.
    """


@hookspec
def register_trackers():
    """Return an iterable of :class:`~fusion_engine.TrackerRecord`.

    A tracker records runs somewhere else (an MLflow server, say). A spec switches it on with
    ``tracking: {NAME: {params}}`` (``NAME: false`` keeps it off), and so does the record's
    ``env`` variable when the spec does not name it. ``create(params)`` returns the run's
    :class:`~fusion_engine.Tracker`, whose ``on_run_start``, ``on_member_ready``,
    ``on_run_end`` and ``on_run_finished`` methods are called as those hooks are; anything they
    raise is contained (one warning; the run goes on untracked, its results unchanged;
    ``run.json`` says so under ``notes.<NAME>``). First-party: ``mlflow``.
    """


@hookspec
def on_run_start(run):
    """Called once a run's spec is resolved and its folder made, before any training.

    ``run`` is the :class:`~fusion_engine.RunContext` (``run.spec``, ``run.run_dir``,
    ``run.run_id``). Return value ignored; an exception aborts the run.
    """


@hookspec
def on_member_ready(run, member):
    """Called once per member when its val and test outputs are ready, trained in this run or
    reused from the zoo.

    ``member`` is a :class:`~fusion_engine.MemberResult` with ``name``, ``key`` (its zoo key),
    ``action`` (``"trained"`` or ``"reused"``), ``logits`` per split (as the zoo stores them,
    before any ``calibrate: temperature``), ``history`` (per-epoch loss and val accuracy),
    ``best_epoch`` and ``card`` (its :class:`~fusion_engine.MemberCard`). Return value ignored.
    """


@hookspec
def on_run_end(run, leaderboard):
    """Called after the leaderboard is written.

    ``leaderboard`` is a :class:`pandas.DataFrame`, one row per member and fuser, as written to
    ``leaderboard.csv``. Return value ignored.
    """


@hookspec
def on_run_finished(run, status):
    """Called last, once per run (once its folder exists), whatever its outcome: after the plots
    and ``report.html`` of a complete run are drawn, after ``run.json`` records a failure.

    ``status`` is ``"complete"``, ``"failed"`` or ``"interrupted"``, as ``run.json`` says. The
    run's outcome is settled: an exception here is logged as a warning and changes nothing.
    What the hook adds with ``run.note(...)`` or logs as a warning is written to ``run.json``.
    Return value ignored.
    """
