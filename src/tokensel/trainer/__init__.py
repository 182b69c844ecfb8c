"""LightningModules, DataModules, callbacks and export. Every class here is nameable by short
`class_path` in recipes."""

from tokensel.trainer.base_trainer import TokenselTrainer

__all__ = ["TokenselTrainer"]
