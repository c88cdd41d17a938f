"""The loyalty rules, pure and without I/O: points, earn rules, tiers and
the checkout's pricing and tenders."""
