"""The loyalty service: sales, the checkout saga, points and tiers."""
