"""The cards service: card programs, member cards and stored value."""
