"""`make bench`: run every benchmark with its defaults.

The member benchmarks need PostgreSQL for their headline figures (the
lookup benchmark only runs there); set ``BENCH_POSTGRES`` to an admin URL
to point them elsewhere.
"""

import os

from bench import (
    campaigns_pricing,
    checkout,
    enrollment,
    members_import,
    members_lookup,
    notify_sms,
    outbox_relay,
    stored_value_debits,
    unit_costs,
)

POSTGRES = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

if __name__ == "__main__":
    enrollment.main([])
    members_import.main([])
    members_import.main(["--postgres", POSTGRES])
    members_lookup.main(["--postgres", POSTGRES])
    outbox_relay.main([])
    outbox_relay.main(["--postgres", POSTGRES])
    stored_value_debits.main([])
    stored_value_debits.main(["--postgres", POSTGRES])
    unit_costs.main(["--postgres", POSTGRES])
    checkout.main([])
    checkout.main(["--postgres", POSTGRES])
    campaigns_pricing.main([])
    campaigns_pricing.main(["--postgres", POSTGRES])
    notify_sms.main([])
    notify_sms.main(["--postgres", POSTGRES])
