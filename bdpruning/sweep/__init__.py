"""The pruning sweep: prune channels in a criterion's order and record clean accuracy and ASR
at every step, exactly; find the accuracy-drop thresholds."""
