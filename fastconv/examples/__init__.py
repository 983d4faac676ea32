"""Worked examples that ``fastconv demo`` runs: a LeNet-style CNN on scikit-learn's bundled
handwritten digits (``digits``), and ``fastconv.convert`` on a ResNet-18 defined here without
torchvision (``resnet``)."""
