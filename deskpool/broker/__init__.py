"""The connection broker: users, entitlements, reservations, hand-over and sessions."""
