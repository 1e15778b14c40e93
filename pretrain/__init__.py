"""DINOv3-recipe pretraining for CT: backbone (``pretrain.models``), losses, data, and the 3-stage trainer."""
