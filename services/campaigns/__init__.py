"""The campaigns service: pricing, coupons, follow-up plans and member events."""
