"""Reproduction of Liao et al. (IEEE TPAMI 2020, arXiv 1810.06767) on the PyTorch adapter.

Command line: ``python -m reference_training {run,grid,report,demo}`` (see ``--help``).

Modules:
    models: the authors' ResNet and DenseNet, He et al.'s CIFAR ResNet-20/32/56 (``build_model``).
    data: CIFAR-10/100, SVHN, MNIST from local files and the offline ``mnist5k``.
    config: ``RunConfig``, everything that determines a run.
    schedules: batch-size and learning-rate schedules by the paper's names.
    train: one measured training run with checkpoints and ``--resume`` (``train``).
    grid: the batch-size × LR grid and dynamic-sampling runs over seeds.
    report: the (C̄_K, L_K) plane, trajectories and the Markdown table.
    demo: fixed batch 64 against s16-to-64 on MNIST-5k.
"""
