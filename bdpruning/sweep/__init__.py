"""The pruning sweep: prune channels in a criterion's order and record clean accuracy and ASR
at every step, exactly; find the accuracy-drop thresholds.

``loop`` (the one loop, every criterion), ``split_engine`` and ``masked`` (its two exact
engines), ``result`` (steps, thresholds, the criterion's choice), ``lab`` (the lab's criterion
and its result form)."""
