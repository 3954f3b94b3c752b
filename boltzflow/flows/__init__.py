"""Flows: priors, flow matching with (equivariant) OT couplings, ODE integration with exact
likelihoods, and the teacher CNF."""

from boltzflow.flows.cnf import FlowOutput, TeacherCNF
from boltzflow.flows.ode import ODEResult, integrate
from boltzflow.flows.priors import MeanFreeGaussian, StandardGaussian

__all__ = [
    "FlowOutput",
    "MeanFreeGaussian",
    "ODEResult",
    "StandardGaussian",
    "TeacherCNF",
    "integrate",
]
