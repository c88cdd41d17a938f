"""The cards service's rules, one module per area. Pure: no I/O, no clock
(``now`` is passed in), no protobuf."""
