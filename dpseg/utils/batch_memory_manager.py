"""``from dpseg.utils.batch_memory_manager import BatchMemoryManager``, Opacus's path."""

from dpseg.privacy.batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager"]
