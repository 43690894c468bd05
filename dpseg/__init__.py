"""dpseg: differentially private training of medical segmentation models.

The public surface mirrors Opacus so that switching is a change of import::

    import dpseg
    engine = dpseg.PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
"""

__version__ = "0.1.0"

from dpseg.privacy import BatchMemoryManager, PrivacyEngine, check_loss, fix  # noqa: E402

__all__ = ["BatchMemoryManager", "PrivacyEngine", "check_loss", "fix", "__version__"]
