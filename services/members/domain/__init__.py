"""The members service's rules, pure (no I/O, no clock of their own):
``members`` for the member file, ``organisation`` for the HQ → region →
store tree and the staff directory."""
