"""Training scripts of a source checkout (``python -m train.<script>``), not installed with the package.

``finetune`` and ``pretrain_prior`` call :mod:`idm.training` (also ``idm finetune`` / ``idm pretrain``);
``gpu_recipe`` (the one-call GPU recipe) and ``convert_scico_dncnn`` (the DnCNN weight converter) are tools.
"""
