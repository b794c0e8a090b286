"""What a model is judged by: a Task (labels, per-sample correctness, agreement with a reference, the
metric, the outputs the analysis attributes error to, and what the device agent returns), found by
name in a registry. Classification is the one built in today; a new kind of model is one new module."""
from quantune_edge.tasks import classification, custom, detection, fidelity  # noqa: F401 (register every task)
from quantune_edge.tasks.base import Task, make_task, registered_tasks, task_from_record

__all__ = ["Task", "make_task", "registered_tasks", "task_from_record"]
