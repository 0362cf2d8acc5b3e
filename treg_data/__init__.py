"""Stage one of treg: score preference pairs with token-level contrastive rewards."""

__version__ = "0.1.0"
