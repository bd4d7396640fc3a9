"""Comparing times taken on different threads.

CLOCK_MONOTONIC is one clock system-wide, but on a virtual machine whose clocksource is the TSC the
vCPUs' counters can disagree by a fraction of a millisecond (seen: 0.66 ms on a 2-vCPU KVM guest), so
a time the IO thread took may read slightly before a time the main thread took earlier.
"""
CLOCK_SKEW_S = 0.005  # well above the skew seen, far below any other clock's offset (seconds to years)


def loads_within(records, t0, t1):
    """True if every load record began after t0 and ended before t1, each start before its end, up to skew."""
    return all(t0 - CLOCK_SKEW_S <= r.start_s <= r.end_s + CLOCK_SKEW_S and r.end_s <= t1 + CLOCK_SKEW_S
               for r in records)
