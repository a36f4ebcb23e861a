"""btm: Branch-Train-Merge as a library.

Train a seed LM, branch it into domain experts (ELMs), train each on its own domain, and use
the forest as a posterior-weighted ensemble or a posterior-weighted parameter average.
No web, no database: the coordinator and the contributor client stand on this.
"""

from btm.errors import BTMError, DataError, FamilyError, ForestError, WeightsError

__all__ = ["BTMError", "DataError", "FamilyError", "ForestError", "WeightsError"]
