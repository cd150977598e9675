"""Numbers bdpruning can stand behind: fp32 precision on every device, a float64 reference with
a round-off bound, and order-independent exact sums."""
