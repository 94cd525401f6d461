"""The label sets models are trained on: Fashion-MNIST (the embedded default's probe) and ImageNet-1k
(timm's classifiers, through timm's ``ImageNetInfo``).

They live with the models so that the dataset loaders (``analysis.datasets``) ask the models layer for
them and no module outside ``analysis/models/`` imports timm; the embedded default reads the
Fashion-MNIST names from here too, so ``analysis.models`` imports nothing from ``analysis.datasets``
(one direction between the two, no cycle).
"""
from __future__ import annotations

import functools

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@functools.lru_cache(maxsize=1)
def imagenet_names() -> tuple[list[str], list[str]]:
    """(synsets ['n01440764', ...], short descriptions ['tench', ...]) of the 1000 ImageNet classes."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = list(info.label_names())
    return synsets, [info.index_to_description(i) for i in range(len(synsets))]
