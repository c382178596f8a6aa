"""The ground floor: user errors, the trust boundary for strangers' bytes, atomic files, devices (Lightning-free)."""
