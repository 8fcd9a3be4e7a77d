"""Bit allocation across tensors and codecs: ``nwc encode --target-bpw`` and ``nwc plan``.

:mod:`~nwcfmt.planner.candidates` lists the settings and measures each (exact bytes, weighted error);
:mod:`~nwcfmt.planner.measure` runs the model to weigh them; :mod:`~nwcfmt.planner.solver` spends the budget;
:mod:`~nwcfmt.planner.plan` turns the choice into a policy file; :mod:`~nwcfmt.planner.check` measures a plan's
end-to-end KL on held-out text; :mod:`~nwcfmt.planner.store` keeps the measurements in a file for later plans.
"""

from nwcfmt.planner.candidates import DEFAULT_FAMILIES, FAMILIES, Option, options
from nwcfmt.planner.plan import BUDGETS, Plan, make_plan

__all__ = ["BUDGETS", "DEFAULT_FAMILIES", "FAMILIES", "Option", "Plan", "make_plan", "options"]
