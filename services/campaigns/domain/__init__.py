"""The campaigns' rules, pure and without I/O: pricing and promotions,
coupons, follow-up plans."""
