"""MPO: the simplex mirror-descent solver for lambda and the log-linear mixed policy."""
