"""The student stage of a run: networks distilled from a teacher, after the fusers are fitted.

A student (``students:`` in the spec) is a backbone trained like a member, on the train split,
with a distillation loss (:class:`fusion_engine.training.DistillationLoss`) against its
teacher's probabilities on train; its epoch is chosen on val, and it predicts val and test once.

The protocol holds for the teacher and the student alike: a fuser teacher was fitted on val
outputs only; its soft targets are that fitted fuser applied to its members' outputs on *train*
(the members predicted train once, stored in the zoo beside val and test). Nothing here reads
test labels, and the student's test outputs are scored like any row's.

A student enters the zoo under a key that holds its teacher's identity: the teacher's name and
kind, its members' keys, its fuser spec, the distillation settings, and the sha256 of the soft
targets themselves (what the student actually learns from), so a changed teacher trains a new
student and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .members import MemberResult, MemberStage, PlannedMember, train_config
from .provenance import member_code, params_for_key
from .zoo import MemberCard, key_material, member_key


@dataclass
class Teacher:
    """What a student learns from: its teacher's probabilities on train, and who the teacher is."""

    name: str
    kind: str  # "fuser" or "member"
    members: dict[str, str | None]  # the teacher's members and their zoo keys
    fuser: dict[str, Any] | None  # a fuser teacher's spec: fuser, params, temperature
    proba: np.ndarray  # (N_train, C), rows sum to 1

    @property
    def targets_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.proba, dtype=np.float32).tobytes()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """The teacher as the student's card shows it: names, members' keys, what it learns from."""
        return {"name": self.name, "kind": self.kind, "members": self.members, "fuser": self.fuser,
                "targets_sha256": self.targets_sha256}

    def for_key(self) -> dict[str, Any]:
        """The teacher as it enters the student's key: no names (as a member's key holds none), so
        renaming a fuser or member retrains nothing; its members' keys in order, its fuser spec and
        the soft targets themselves."""
        return {"kind": self.kind, "members": list(self.members.values()), "fuser": self.fuser,
                "targets_sha256": self.targets_sha256}


def teachers(spec, members: dict[str, MemberResult], fitted: dict) -> dict[str, Teacher]:
    """Each student's teacher, from the run's members (their outputs on train, calibrated as the
    fusers saw them) and its fitted fusers (``name -> FittedFuser``)."""
    from scipy.special import softmax

    out = {}
    for student in spec.students:
        if student.teacher in fitted:
            f = fitted[student.teacher]
            stacked = np.stack([members[n].logits["train"] for n in f.members])
            proba = np.asarray(f.model.predict_proba(stacked), dtype=np.float64)
            fuser = {"fuser": f.spec.fuser, "params": f.bound.params.model_dump(mode="json"),
                     "temperature": f.spec.temperature}
            out[student.name] = Teacher(student.teacher, "fuser", {n: members[n].key for n in f.members}, fuser, proba)
        else:
            m = members[student.teacher]
            proba = softmax(m.logits["train"].astype(np.float64), axis=1)
            out[student.name] = Teacher(m.name, "member", {m.name: m.key}, None, proba)
    return out


class StudentStage(MemberStage):
    """Settles every student of a spec, the way :class:`MemberStage` settles members: reused from
    the zoo under its key, else trained by the executor (with its teacher's soft targets) and
    stored."""

    kind = "student"

    def __init__(self, resolved, checked, reg, data, executor, teachers: dict[str, Teacher], **kwargs):
        super().__init__(resolved, checked, reg, data, executor, **kwargs)
        self.items, self.bound = self.spec.students, self.resolved.students
        self.inputs, self.origins, self.references = checked.student_inputs, {}, {}
        self.pretrained = checked.student_pretrained
        self.need_train = set()
        self.teachers = teachers

    def _plan(self) -> list[PlannedMember]:
        spec, data = self.spec, self.data
        planned = []
        for i, (sspec, bound) in enumerate(zip(self.items, self.bound)):
            seed = spec.seed if sspec.seed is None else sspec.seed
            material = key_material(
                backbone=bound.record.name,
                params=params_for_key(bound.params.model_dump(mode="json"), self.resolved.base_dir),
                train=train_config(sspec.train), seed=seed, image_size=spec.data.image_size, mean=spec.data.mean,
                std=spec.data.std, code=member_code(bound.provided), fingerprint=data.fingerprint, split=data.split,
                weights=self.pretrained.get(i),
                source={"student": {**self.teachers[sspec.name].for_key(),
                                    "distill": sspec.distill.model_dump(mode="json")}})
            planned.append(PlannedMember(i, sspec.name, "student", member_key(material), material, seed))
        return planned

    def _job(self, p: PlannedMember):
        job = super()._job(p)
        job.soft_targets = np.ascontiguousarray(self.teachers[p.name].proba, dtype=np.float32)
        job.distill = self.items[job.index].distill
        return job

    def _card(self, p: PlannedMember, **fields) -> MemberCard:
        teacher = {**self.teachers[p.name].identity(), "distill": self.items[p.index].distill.model_dump(mode="json")}
        return super()._card(p, teacher=teacher, **fields)
