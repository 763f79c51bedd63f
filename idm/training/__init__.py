"""Training: pre-training of the diffusion prior (:mod:`idm.training.pretrain`) and end-to-end
fine-tuning of the IDM network or the unrolled baseline (:mod:`idm.training.finetune`), with what
they share (:mod:`idm.training.common`).

Each entry point exposes ``main(argv=None) -> int`` and is reached as ``idm pretrain`` /
``idm finetune``, ``python -m idm.training.pretrain`` / ``python -m idm.training.finetune`` (any
installation), or, from a source checkout, through the scripts ``python -m train.pretrain_prior`` /
``python -m train.finetune``. Importing this package imports nothing heavy (no torch, no accelerate).
"""
