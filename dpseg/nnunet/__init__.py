"""nnU-Net v2 trained with DP-SGD over cases (``dpseg nnunet``; the ``nnunet`` extra).

Importing this package does not import nnunetv2; dpseg.nnunet.trainer and
dpseg.nnunet.launch do, after dpseg.nnunet.requirement.require_nnunet() has checked it."""
