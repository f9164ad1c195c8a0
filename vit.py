"""vit.py: a Vision Transformer from scratch (its issue fills this in)."""
