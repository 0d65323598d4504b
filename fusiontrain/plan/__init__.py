"""Sizing a run before it is queued: the planner, its traced step and memory tracker."""
