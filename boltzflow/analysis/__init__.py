"""Analyses of stored samples: the applications behind ``boltzflow reweight`` and
``boltzflow estimate``.

- :mod:`~boltzflow.analysis.reweight`: :func:`reweight_analysis` (weights, ESS, log Z, metrics
  against reference samples, plots, a markdown + JSON report);
- :mod:`~boltzflow.analysis.estimate`: :func:`estimate_from_spec` and the one evaluation of an
  estimate spec (observables, ΔF) that the workflow report shares;
- :mod:`~boltzflow.analysis.report`: the markdown + JSON report of results holding
  :class:`~boltzflow.sampling.results.Estimate` s (also used by the workflow report);
- :mod:`~boltzflow.analysis.trajectory`: molecular samples as trajectory files, optionally
  resampled by weight.

Why a package of its own: these analyses combine the importance-sampling primitives of
:mod:`boltzflow.sampling` with file formats (:mod:`boltzflow.io`), metrics
(:mod:`boltzflow.metrics`) and plots (:mod:`boltzflow.plots`). Living inside ``sampling`` they
pulled that low-level package up into all three; here they sit above them, below only the
command line (:mod:`boltzflow.cli`) and the workflows (:mod:`boltzflow.workflow`), and nothing
under them imports this package. Not in :mod:`boltzflow.workflow` either, because the
``reweight`` and ``estimate`` commands work on any sample file, without a workflow. The report
writer and the trajectory export moved here from :mod:`boltzflow.io` for the same reason: they
know estimates and resampling, and in ``io`` they closed the package cycle
io -> sampling -> systems -> io.

Submodules are imported explicitly (``from boltzflow.analysis.reweight import
reweight_analysis``) so that importing the package stays light.
"""
