"""The members service: the chain's member files."""
