"""Analyses of stored samples: the applications behind ``boltzflow reweight`` and
``boltzflow estimate``.

- :mod:`~boltzflow.analysis.reweight`: :func:`reweight_analysis` (weights, ESS, log Z, metrics
  against reference samples, plots, a markdown + JSON report);
- :mod:`~boltzflow.analysis.estimate`: :func:`estimate_from_spec` and the one evaluation of an
  estimate spec (observables, ΔF) that the workflow report shares.

Why a package of its own: these analyses combine the importance-sampling primitives of
:mod:`boltzflow.sampling` with file formats (:mod:`boltzflow.io`), metrics
(:mod:`boltzflow.metrics`) and plots (:mod:`boltzflow.plots`). Living inside ``sampling`` they
pulled that low-level package up into all three; here they sit above them, below only the
command line (:mod:`boltzflow.cli`) and the workflows (:mod:`boltzflow.workflow`), and nothing
under them imports this package. Not in :mod:`boltzflow.workflow` either, because the
``reweight`` and ``estimate`` commands work on any sample file, without a workflow.

Submodules are imported explicitly (``from boltzflow.analysis.reweight import
reweight_analysis``) so that importing the package stays light.
"""
