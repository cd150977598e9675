"""Measuring models: batched prediction, exact counts and rates, GoodNet, and counting in
one process without Lightning."""
