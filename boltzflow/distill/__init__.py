"""Distilled few-step students of a teacher CNF.

- :mod:`~boltzflow.distill.base`: the shared :class:`Student` interface (``sample(n, steps)``,
  ``log_prob(x, steps)``, save/load with a system check) and :func:`load_student`;
- :mod:`~boltzflow.distill.f2d2`: F2D2, a flow map with an average-divergence head;
- :mod:`~boltzflow.distill.falcon`: FALCON, a flow map with exact per-step log-determinants;
- :mod:`~boltzflow.distill.baselines`: K Euler steps of the teacher (Euler-rule or exact log q);
- :mod:`~boltzflow.distill.nf`: a small coupling normalizing flow (exact one-pass log q), trained
  by :mod:`~boltzflow.distill.nf_train` (losses in :mod:`~boltzflow.distill.nf_losses`, the
  ``distill --method nf`` entry in :mod:`~boltzflow.distill.nf_run`);
- :mod:`~boltzflow.distill.nf_internal`: a coupling NF in a molecule's internal coordinates with
  circular splines for the dihedrals, trained on data by
  :mod:`~boltzflow.distill.nf_internal_train` (``boltzflow train nf``);
- :mod:`~boltzflow.distill.train_students`: distillation runs (configs, losses, training).
"""

from boltzflow.distill.base import STUDENTS, Student, load_student, register_student
from boltzflow.distill.baselines import EulerBaseline
from boltzflow.distill.f2d2 import F2D2
from boltzflow.distill.falcon import FALCON
from boltzflow.distill.nf import NFStudent
from boltzflow.distill.nf_internal import InternalNFStudent

__all__ = [
    "F2D2",
    "FALCON",
    "STUDENTS",
    "EulerBaseline",
    "InternalNFStudent",
    "NFStudent",
    "Student",
    "load_student",
    "register_student",
]
