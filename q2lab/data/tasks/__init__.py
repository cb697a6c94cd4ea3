"""Evaluation task data: multiple-choice sets (HellaSwag, ARC, PIQA, …) and their loaders."""

from q2lab.data.tasks.mc import MCItem, MCTask, load_mc_task, mc_task_names

__all__ = ["MCItem", "MCTask", "load_mc_task", "mc_task_names"]
