"""SimCLR on digit images with a learned smooth-warp augmentation network.

The augmentation network's weights are meta-parameters learned with metaopt;
``python -m examples.simclr`` compares that against the same network kept fixed.
"""

__all__: list[str] = []
