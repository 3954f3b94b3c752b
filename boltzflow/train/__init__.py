"""Training: the shared loop (:mod:`~boltzflow.train.trainer`), TOML configs
(:mod:`~boltzflow.train.config`) and the teacher's flow-matching run
(:mod:`~boltzflow.train.teacher`). Checkpoint files live with the other file formats in
:mod:`boltzflow.io.checkpoint`.

Submodules are imported explicitly (``from boltzflow.train.trainer import Trainer``) so that
importing the package stays light and free of import cycles with :mod:`boltzflow.flows`.
"""
