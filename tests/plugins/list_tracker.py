"""A tracker plugin file as a user would write one: it lists the lifecycle events it hears, and
raises in the one its ``fail_in`` param names (``create``: when it is made)."""

from typing import Optional

from fusion_engine import Params, Tracker, TrackerRecord, hookimpl

EVENTS = []


class ListParams(Params):
    fail_in: Optional[str] = None


class ListTracker(Tracker):
    def __init__(self, params: ListParams):
        if params.fail_in == "create":
            raise ConnectionError("no tracking today")
        self.fail_in = params.fail_in

    def event(self, name, detail):
        EVENTS.append((name, detail))
        if name == self.fail_in:
            raise RuntimeError(f"broken in {name}")

    def on_run_start(self, run):
        run.note("list", heard="start")
        self.event("on_run_start", run.run_id)

    def on_member_ready(self, run, member):
        self.event("on_member_ready", member.name)

    def on_run_end(self, run, leaderboard):
        self.event("on_run_end", len(leaderboard))

    def on_run_finished(self, run, status):
        self.event("on_run_finished", (status, (run.run_dir / "report.html").is_file()))


@hookimpl
def register_trackers():
    return [TrackerRecord("list", ListTracker, ListParams, env="FE_TEST_LIST_TRACKER")]
