"""The task builders: pure functions over plain cell records (builders.py, spatial.py, perturbation.py), the
templates as data (templates/<task>.json), and the token budget. The registry itself (task names, families,
inputs, the default mixture) is data the trainer shares: schemas/tasks.py.
"""

from schemas.tasks import DEFAULT_MIXTURE, NOT_BUILT_REASON, TASKS, TaskSpec

__all__ = ["DEFAULT_MIXTURE", "NOT_BUILT_REASON", "TASKS", "TaskSpec"]
