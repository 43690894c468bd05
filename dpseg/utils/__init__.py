"""Opacus's import paths for the utilities (``opacus.utils.batch_memory_manager``)."""
