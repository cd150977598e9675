"""What tests share besides fixtures: the real Lab-3 material, data makers, small nets, the
planted BadNet, reference computations, conditions (skips, round-off safety) and the in-process
``bdprune`` runner. Fixtures live in ``tests/conftest.py``; import these as ``helpers.<module>``."""
