"""Stage one of treg: score preference pairs with token-level contrastive rewards."""
