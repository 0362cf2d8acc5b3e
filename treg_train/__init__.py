"""Stage two of treg: train a policy on scored shards with the regularized preference losses."""
